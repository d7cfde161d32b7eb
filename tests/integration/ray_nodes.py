"""Real Ray nodes for integration tests: `ray start` processes on this machine, with token auth, that
are torn down without `ray stop`.

    cluster = start_cluster([{"num_cpus": 4}], dashboard=True)   # a head (first) and optional worker nodes
    subprocess.run([...], env=cluster.env)                         # clients: RAY_AUTH_MODE=token + its token
    stop_cluster(cluster)

Why not `ray stop --force`: it kills every Ray process of the user on the machine, including the local
clusters of other tests and other runs going on beside this one. Instead:
- each node is one `ray start --block` process in a session of its own; SIGTERM makes it stop exactly
  the processes it started (raylet, GCS, dashboard, workers);
- the cluster gets its own --temp-dir, so its `ray_current_cluster` file is not in /tmp/ray, and a plain
  `ray.init()` elsewhere never connects to it by accident;
- its token is a file of its own (RAY_AUTH_TOKEN_PATH), so ~/.ray/auth_token is neither read nor written;
- every process it starts inherits RLHF_TEST_RAY_CLUSTER=<its temp dir>: whatever survives the SIGTERM
  (a job's driver, vLLM children) is found by that variable and killed.
Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
MARKER = "RLHF_TEST_RAY_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    root: Path                      # temp dir: token, logs, Ray's --temp-dir
    env: dict[str, str]             # environment for clients (and what the nodes were started with)
    gcs_address: str                # host:port, for ray.init(address=...) / RAY_ADDRESS
    dashboard_url: str | None       # http://127.0.0.1:PORT when started with the dashboard (job API)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(self.root.glob("*.log")))


def _wait(what: str, ready, deadline_s: float, cluster: RayCluster) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in cluster.procs):
            raise RuntimeError(f"a Ray node exited while waiting for {what}:\n{cluster.log_tail()}")
        if ready():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} not ready within {deadline_s:g}s:\n{cluster.log_tail()}")


def _started(log: Path) -> bool:
    return log.exists() and "Ray runtime started" in log.read_text(errors="replace")


def _dashboard_up(url: str, token: str) -> bool:
    req = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_cluster(nodes: list[dict], dashboard: bool = False, deadline_s: float = 180, hosts=None) -> RayCluster:
    """nodes[0] is the head. Each dict: num_cpus (int), resources (dict, optional). With `hosts`
    (netns.make_hosts), node i runs inside host i at its own address; else all nodes use 127.0.0.1."""
    ips = hosts.addrs if hosts is not None else ["127.0.0.1"] * len(nodes)
    root = Path(tempfile.mkdtemp(prefix="rlhf-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), **{MARKER: str(root)},
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # `rlhf` for job drivers
    port = free_port()
    dash_port = free_port() if dashboard else None
    cluster = RayCluster(root, env, f"{ips[0]}:{port}", f"http://{ips[0]}:{dash_port}" if dashboard else None)
    try:
        for i, node in enumerate(nodes):
            # Every port Ray would otherwise take from a fixed default gets a free one (other Ray
            # clusters may be running on this machine).
            cmd = [RAY, "start", "--block", "--node-ip-address", ips[i], "--num-cpus", str(node["num_cpus"]),
                   "--resources", json.dumps(node.get("resources", {})), "--temp-dir", str(root / "ray"),
                   "--object-store-memory", str(300 * 2**20), "--dashboard-agent-listen-port", str(free_port()),
                   "--disable-usage-stats"]
            if i == 0:
                cmd += ["--head", "--port", str(port), "--ray-client-server-port", str(free_port())]
                cmd += (["--include-dashboard", "true", "--dashboard-host", ips[0], "--dashboard-port", str(dash_port)]
                        if dashboard else ["--include-dashboard", "false"])
            else:
                cmd += ["--address", cluster.gcs_address]
            if hosts is not None:
                cmd = hosts.wrap(i, cmd)
            log = root / f"node{i}.log"
            with open(log, "w") as out:
                cluster.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                      stdin=subprocess.DEVNULL, start_new_session=True))
            _wait(f"Ray node {i}", lambda log=log: _started(log), deadline_s, cluster)
        if dashboard:
            _wait("the dashboard's job API", lambda: _dashboard_up(cluster.dashboard_url, token.read_text()),
                  deadline_s, cluster)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _leftovers(root: Path) -> list:
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER) == str(root):
                found.append(p)
        except psutil.Error:
            pass  # gone, or not ours to read
    return found


def stop_cluster(cluster: RayCluster, keep_files: bool = False) -> None:
    """SIGTERM each `ray start --block` (worker nodes first), then SIGKILL whatever still carries the marker."""
    import psutil

    for proc in reversed(cluster.procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    left = _leftovers(cluster.root)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=30)
    if not keep_files:
        shutil.rmtree(cluster.root, ignore_errors=True)
