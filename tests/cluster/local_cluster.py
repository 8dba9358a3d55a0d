"""A multi-node Ray cluster on one machine, made of separate `ray start --block` process groups.

Every node gets its own ports (nothing on Ray's defaults: other clusters may run on this machine) and
its own short temp dir, and runs in its own process group, so one node can be killed alone
(SIGKILL to the group: raylet, agents and the workers on it, as when a machine is lost) and the
whole cluster can be removed without touching any other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(width: int = 60) -> tuple[int, int]:
    """A run of ``width`` ports that are free now (for one node's worker processes)."""
    while True:
        start = free_port()
        if start + width > 65000:
            continue
        try:
            for port in range(start, start + width):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return start, start + width - 1
        except OSError:
            continue


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    temp_dir: str
    resources: dict
    log_path: Path

    def kill(self) -> None:
        """Lose the node: SIGKILL its whole process group."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


@dataclass
class LocalCluster:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="csc-", dir="/tmp")))
    env: dict = field(default_factory=dict)
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Token auth off (Ray 2.60 enables it by default; this cluster is local and short-lived), and a
        # dead node is declared dead within ~3 s instead of the default ~30 s.
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3", "RAY_health_check_timeout_ms": "1000",
                    "RAY_USAGE_STATS_ENABLED": "0", **self.env}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_node(self, name: str, num_cpus: float, resources: dict | None = None, head: bool = False) -> Node:
        temp_dir = str(self.root / name)
        low, high = free_port_range()
        taken = {self.gcs_port, self.dashboard_port}

        def node_port() -> int:
            """A free port for one component, outside this node's worker range and not used yet."""
            while True:
                port = free_port()
                if not low <= port <= high and port not in taken:
                    taken.add(port)
                    return port

        args = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                f"--num-cpus={num_cpus}", "--object-store-memory=200000000",
                f"--node-manager-port={node_port()}", f"--object-manager-port={node_port()}",
                f"--metrics-export-port={node_port()}", f"--dashboard-agent-listen-port={node_port()}",
                f"--dashboard-agent-grpc-port={node_port()}", f"--runtime-env-agent-port={node_port()}",
                f"--min-worker-port={low}", f"--max-worker-port={high}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        if head:
            args += ["--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                     f"--ray-client-server-port={node_port()}"]
        else:
            args += [f"--address={self.address}", "--node-ip-address=127.0.0.1"]
        log_path = self.root / f"{name}.log"
        process = subprocess.Popen(args, env=self.env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        node = Node(name, process, temp_dir, resources or {}, log_path)
        self.nodes.append(node)
        return node

    def alive_nodes(self) -> list[dict]:
        """The state API's view of the live nodes (node_id, resources_total, ...)."""
        try:
            r = httpx.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100}, timeout=10)
            result = r.json()["data"]["result"]["result"]
        except (httpx.HTTPError, KeyError, ValueError):
            return []
        return [n for n in result if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process.poll() is not None and node.process.returncode not in (None, -9):
                    raise RuntimeError(f"node {node.name} exited: {node.log_path.read_text()[-2000:]}")
            nodes = self.alive_nodes()
            if len(nodes) == count:
                return nodes
            time.sleep(1)
        raise TimeoutError(f"{count} live nodes not seen within {timeout_s} s; last: {self.alive_nodes()}")

    def node_id_with(self, resource: str, nodes: list[dict], exclude: set[str] = frozenset()) -> str:
        found = [n["node_id"] for n in nodes if resource in n["resources_total"] and n["node_id"] not in exclude]
        if len(found) != 1:
            raise AssertionError(f"expected one node with {resource} outside {exclude}, got {found}")
        return found[0]

    def serve(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "serve"), *args, "-a", self.dashboard_url], env=self.env,
                              capture_output=True, text=True, timeout=timeout_s)

    def shutdown(self) -> None:
        """Kill every node's process group, then any process of ours left outside them (by our temp dir)."""
        for node in reversed(self.nodes):
            node.kill()
        marker = str(self.root)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.root, ignore_errors=True)
