"""Hosts with their own addresses on one machine, for multi-node tests: Linux network namespaces joined
by a bridge.

    hosts = make_hosts(2)        # namespaces rlhf<tag>h0, h1 at 10.A.B.2, 10.A.B.3; this machine is 10.A.B.1
    subprocess.Popen(hosts.wrap(0, ["ray", "start", ...]))   # runs inside host 0
    remove_hosts(hosts)          # namespaces, veths and the bridge are gone

Each namespace has its loopback, one veth into the bridge and a default route through this machine, so
a process in it sees only its own address: Ray, gloo and vLLM on different hosts must reach each other
over 10.A.B.0/24 exactly as on separate machines. The subnet and names carry a random tag, so
concurrent test runs do not collide. Needs root (CAP_NET_ADMIN) and iproute2; `available()` says why not.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field


@dataclass
class Hosts:
    tag: str
    names: list[str]                 # namespace per host
    addrs: list[str]                 # its address
    gateway: str                     # this machine's address on the bridge
    bridge: str
    made: list[list[str]] = field(default_factory=list)  # teardown commands, in order

    def wrap(self, i: int, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[i], *cmd]


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN)"
    probe = f"rlhfprobe{random.randrange(10**6)}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return f"ip netns add failed: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def make_hosts(n: int) -> Hosts:
    tag = f"{random.randrange(16**4):04x}"
    a, b = random.randrange(100, 250), random.randrange(1, 250)
    hosts = Hosts(tag, [f"rlhf{tag}h{i}" for i in range(n)], [f"10.{a}.{b}.{i + 2}" for i in range(n)],
                  f"10.{a}.{b}.1", f"rlbr{tag}")
    try:
        _ip("link", "add", hosts.bridge, "type", "bridge")
        hosts.made.append(["link", "del", hosts.bridge])
        _ip("addr", "add", f"{hosts.gateway}/24", "dev", hosts.bridge)
        _ip("link", "set", hosts.bridge, "up")
        for i, (ns, addr) in enumerate(zip(hosts.names, hosts.addrs)):
            outer, inner = f"rlv{tag}{i}", f"rlp{tag}{i}"  # interface names: at most 15 characters
            _ip("netns", "add", ns)
            hosts.made.insert(0, ["netns", "del", ns])
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            hosts.made.insert(0, ["link", "del", outer])  # deleting one end deletes the pair
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", hosts.bridge)
            _ip("link", "set", outer, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", inner)
            _ip("netns", "exec", ns, "ip", "link", "set", inner, "up")
            _ip("netns", "exec", ns, "ip", "route", "add", "default", "via", hosts.gateway)
    except BaseException:
        remove_hosts(hosts)
        raise
    return hosts


def remove_hosts(hosts: Hosts) -> None:
    """Undo make_hosts (what exists of it). Processes still inside a namespace keep it alive until they
    exit: stop them first."""
    for cmd in hosts.made:
        subprocess.run(["ip", *cmd], capture_output=True, timeout=30)
    hosts.made.clear()
