"""Which network interface gloo uses, on nodes with more than one.

Gloo binds to the address the machine's host name resolves to unless GLOO_SOCKET_IFNAME names an
interface. On a multi-homed node (a cluster network beside a management one), in a container, or in a
network namespace, that address can be on a network the peers cannot reach, or not on this host at
all, and the process group then fails to connect. Ray already knows the address this node talks to
the cluster on; `pin_gloo_interface` points gloo at the interface that carries it. A value the user set
is kept. NCCL picks its own interfaces (NCCL_SOCKET_IFNAME) and is not touched here.
"""

from __future__ import annotations

import os
import socket
import sys


def interface_of(ip: str) -> str | None:
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def pin_gloo_interface() -> str | None:
    """Set GLOO_SOCKET_IFNAME (unless set) to the interface of this Ray node's address; returns it."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    ray = sys.modules.get("ray")  # not imported: no Ray here (an in-process worker), and none needed
    if ray is None or not ray.is_initialized():
        return None
    name = interface_of(ray.util.get_node_ip_address())
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = name
    return name
