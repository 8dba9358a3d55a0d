"""``--launch serve_config.yaml``: our app on a private, single-node Ray cluster, torn down afterwards.

Steps: ``ray start --head --block`` on free ports with its own temp dir (so it never touches another
cluster on the machine, nor ``/tmp/ray``'s "current cluster" that ``address="auto"`` reads), then
``serve deploy`` of a copy of the config whose HTTP port is a free one, then wait for ``/readyz``.
Teardown: ``serve shutdown``, then SIGTERM to the head's process group (Ray drains and stops the
processes it started), SIGKILL to that group if it lingers. Nothing else is signalled: no
``ray stop``, which would stop every cluster of this user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from serve_app.ingress.keys import FileKeyStore, new_key

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class LaunchedApp:
    url: str
    dashboard_url: str
    config: str
    temp_dir: str
    api_key: str  # the benchmark's own key to the launched app


def write_config(config_path: str, http_port: int, out_dir: str) -> tuple[str, str]:
    """A copy of the Serve config with the HTTP proxy on ``127.0.0.1:http_port`` and a keys file of
    its own holding one key for the benchmark, whose quota is the machine's, not a client's (the
    load generator is one identity; ``args.limits`` would cap it like any single client). Returns
    (config path, the key)."""
    config = yaml.safe_load(Path(config_path).read_text())
    config["http_options"] = {**(config.get("http_options") or {}), "host": "127.0.0.1", "port": http_port}
    key, record = new_key("benchmark", admin=True, name="benchmarks --launch", requests_per_min=10**6,
                          tokens_per_min=10**9, max_concurrent_replies=10**4)
    keys_file = Path(out_dir) / "keys.json"
    FileKeyStore(keys_file).write(record)
    for app in config["applications"]:
        app["args"] = {**(app.get("args") or {})}
        app["args"]["auth"] = {**app["args"].get("auth", {}), "keys_file": str(keys_file)}
    out = Path(out_dir) / "serve_config.yaml"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(out), key


def wait_until(check, timeout_s: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the Ray head exited with code {process.returncode}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s")


@contextlib.contextmanager
def launch_app(config_path: str, num_cpus: int | None = None, ready_timeout_s: float = 300.0, log=print):
    """Start the app described by ``config_path``; yield a :class:`LaunchedApp`; tear it all down."""
    temp_dir = tempfile.mkdtemp(prefix="rb-")  # short: Ray's socket paths live under it
    gcs, dashboard, metrics, client, agent, http = free_ports(6)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_metrics_report_interval_ms": os.environ.get("RAY_metrics_report_interval_ms", "1000"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    head_log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - closed in finally
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dashboard),
           "--metrics-export-port", str(metrics), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--temp-dir", temp_dir, "--include-dashboard", "true",
           "--disable-usage-stats"]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    head = subprocess.Popen(cmd, env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard_url = f"http://127.0.0.1:{dashboard}"
    config, api_key = write_config(config_path, http, temp_dir)
    app = LaunchedApp(url=f"http://127.0.0.1:{http}", dashboard_url=dashboard_url, config=config, temp_dir=temp_dir,
                      api_key=api_key)
    try:
        log(f"launch: Ray head (pid {head.pid}, dashboard {dashboard_url}), deploying {config_path}")
        wait_until(lambda: httpx.get(dashboard_url + "/api/version", timeout=2).status_code == 200, 120,
                   "Ray dashboard", head)
        subprocess.run([str(BIN / "serve"), "deploy", app.config, "--address", dashboard_url], env=env, check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
        try:
            wait_until(lambda: httpx.get(app.url + "/readyz", timeout=5).status_code == 200, ready_timeout_s,
                       "app /readyz", head)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; Serve says: {serve_status_text(dashboard_url)}") from None
        log(f"launch: app ready at {app.url}")
        yield app
    finally:
        log("launch: tearing down")
        if head.poll() is None:
            subprocess.run([str(BIN / "serve"), "shutdown", "--yes", "--address", dashboard_url], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=90, check=False)
            stop_process_group(head, grace_s=45)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def serve_status_text(dashboard_url: str) -> str:
    """The applications' and deployments' status messages, to explain a deployment that never got ready."""
    try:
        apps = httpx.get(dashboard_url + "/api/serve/applications/", timeout=10).json().get("applications") or {}
    except (httpx.HTTPError, ValueError) as exc:
        return repr(exc)
    parts = []
    for name, app in apps.items():
        parts.append(f"{name}: {app.get('status')} {app.get('message', '')}".strip())
        for dname, d in (app.get("deployments") or {}).items():
            parts.append(f"{dname}: {d.get('status')} {d.get('message', '')}".strip())
    return "; ".join(parts)[:4000] or "no applications"


def stop_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the group ``process`` leads (started with ``start_new_session``), SIGKILL after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
