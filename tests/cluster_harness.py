"""A multi-node Ray cluster on one machine, as a cluster user has it.

Every node is a real ``ray start`` in its own mount namespace (``unshare -m``, root):

- the head (``num_cpus=0``: no task runs there, as on a head kept free for the GCS and the
  driver) sees the whole machine;
- each worker node sees the machine with the head's node-local folder (``head_local``) replaced by
  an empty tmpfs of its own, so a file the driver writes there is missing on a worker node, and a
  file a worker node writes there lands on that node's "disk", invisible to everyone else;
- ``shared`` is seen by every node at the same path (the NFS/EFS mount of a real cluster).

``kill_node`` SIGKILLs every process in a node's namespace (raylet, object store, workers): a
machine lost mid-run. The GCS is told to notice a dead node within a few seconds.

The cluster has its own Ray temp folder, so it is never the cluster a plain ``ray.init()`` of
another test finds.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# fast dead-node detection (defaults: ~30 s); read by the GCS at start
HEALTH_ENV = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
              "RAY_health_check_timeout_ms": "2000", "RAY_health_check_failure_threshold": "3"}


def unavailable() -> str | None:
    """Why the harness cannot start here, or None."""
    if sys.platform != "linux":
        return "needs Linux mount namespaces"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    if os.geteuid() != 0:
        return "needs root for unshare -m and tmpfs mounts"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs tmpfs /mnt && umount /mnt"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"unshare -m / mount failed: {r.stderr.strip()[:200]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    ns: str
    cpus: float
    log: Path
    resources: dict = field(default_factory=dict)

    def processes(self) -> list[int]:
        return [p for p in _pids() if _mnt_ns(p) == self.ns]


class LocalCluster:
    def __init__(self, base: Path, object_store_mb: int = 250):
        self.base = Path(base)
        self.head_local = self.base / "head-local"
        self.shared = self.base / "shared"
        self.logs = self.base / "logs"
        for d in (self.head_local, self.shared, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.temp = Path(f"/tmp/tmn-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths have a length limit
        self.object_store = object_store_mb * 2**20
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, Node] = {}
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **HEALTH_ENV}
        self.env.pop("RAY_ADDRESS", None)

    # -- nodes -----------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str], hide: bool, cpus: float, resources: dict) -> Node:
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", *args, f"--num-cpus={int(cpus)}",
               f"--object-store-memory={self.object_store}", f"--temp-dir={self.temp}",
               "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats", "--block",
               *[f"{p}={free_port()}" for p in ports]]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        mount = f"mount -t tmpfs tmpfs {self.head_local} && " if hide else ""
        script = mount + "exec " + " ".join(f"'{c}'" for c in cmd)
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                stdout=log.open("ab"), stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True, cwd=str(self.base))
        ns = None
        for _ in range(100):
            ns = _mnt_ns(proc.pid)
            if ns and ns != _mnt_ns(os.getpid()):
                break
            time.sleep(0.05)
        node = Node(name, proc, ns, cpus, log, resources)
        self.nodes[name] = node
        return node

    def start_head(self) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false"], hide=False, cpus=0,
                    resources={})
        self._wait_alive(1)

    def add_node(self, name: str, cpus: float = 4, resources: dict | None = None) -> Node:
        """A worker node; ``resources`` are custom resources (e.g. to steer work onto it)."""
        alive = self.alive_count()
        node = self._start(name, [f"--address={self.address}"], hide=True, cpus=cpus,
                           resources={f"node_{name}": 1000, **(resources or {})})
        self._wait_alive(alive + 1)
        return node

    def kill_node(self, name: str, wait_dead_s: float = 60) -> None:
        """SIGKILL every process of the node, then wait until the cluster has noticed."""
        node = self.nodes.pop(name)
        for _ in range(50):
            pids = node.processes()
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        node.proc.wait(timeout=10)
        deadline = time.monotonic() + wait_dead_s
        while self.alive_count() > len(self.nodes) and time.monotonic() < deadline:
            time.sleep(0.5)

    def node_of_process(self, pid: int) -> str | None:
        ns = _mnt_ns(pid)
        return next((n.name for n in self.nodes.values() if n.ns == ns), None)

    def find_processes(self, needle: str) -> dict[int, str]:
        """pid → node name of every process of the cluster whose command line contains ``needle``
        (Ray names a task's worker process ``ray::<function>`` while it runs)."""
        found = {}
        for p in _pids():
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                node = self.node_of_process(p)
                if node is not None:
                    found[p] = node
        return found

    # -- state -----------------------------------------------------------------------------------
    def _query(self, code: str, timeout: float = 60) -> str:
        """Run ``code`` in a short-lived driver connected to the cluster; its stdout."""
        prog = ("import ray, json, logging\n"
                f"ray.init(address='{self.address}', log_to_driver=False, logging_level=logging.ERROR)\n" + code)
        r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=self.env, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"cluster query failed: {r.stderr[-2000:]}")
        return r.stdout

    def alive_count(self) -> int:
        if "head" not in self.nodes:
            return 0
        try:
            return int(self._query("print(sum(1 for n in ray.nodes() if n['Alive']))").strip().splitlines()[-1])
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError):
            return 0

    def _wait_alive(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_count() >= n:
                return
            time.sleep(0.5)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in self.logs.glob("*.log"))
        raise RuntimeError(f"the harness cluster did not reach {n} alive nodes in {timeout:.0f} s\n{logs}")

    def ray_node_ids(self) -> dict[str, str]:
        """Harness node name → Ray node id (worker nodes carry a ``node_<name>`` resource)."""
        out = self._query("print(json.dumps([[n['NodeID'], list(n['Resources'])] for n in ray.nodes() "
                          "if n['Alive']]))")
        ids = {}
        for nid, res in json.loads(out.strip().splitlines()[-1]):
            names = [r[5:] for r in res if r.startswith("node_") and r[5:] in self.nodes]
            ids[names[0] if names else "head"] = nid
        return ids

    def shutdown(self) -> None:
        for name in list(self.nodes):
            if name != "head":
                self.kill_node(name, wait_dead_s=0)
        if "head" in self.nodes:
            self.kill_node("head", wait_dead_s=0)
        shutil.rmtree(self.temp, ignore_errors=True)
