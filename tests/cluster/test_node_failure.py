"""A model replica survives the loss of its node: a real multi-node Ray cluster on this machine.

Head (no ``model_node`` resource) + node A (``model_node``), `serve deploy` of serve_config.yaml with
the model replica needing ``model_node`` (so it lands on A), then node B (``model_node``) joins as a
standby. Under a light stream of requests, node A is killed (SIGKILL to its process group). Serve
restarts the replica on B; requests fail for a while and then succeed again, served from node B.
"""

import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.ingress.keys import FileKeyStore, new_key

from .local_cluster import LocalCluster, free_port

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource


def cluster_config(http_port: int, keys_file: Path) -> dict:
    """serve_config.yaml, with the model replica pinned to ``model_node`` nodes and sized for this
    machine, and the keys file the test's key is in (every node is this machine, so they all read it)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["proxy_location"] = "HeadOnly"  # one proxy: all nodes share this machine's ports
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    app = config["applications"][0]
    app["args"]["auth"] = {"keys_file": str(keys_file)}
    app["args"]["model"].update(num_threads=1, max_seq_len=512, kv_budget_tokens=4096, default_max_tokens=8)
    for deployment in app["deployments"]:
        if deployment["name"] == "ModelServer":
            deployment.pop("autoscaling_config")
            deployment["num_replicas"] = 1
            deployment["ray_actor_options"] = {"num_cpus": 0.5, "resources": {"model_node": 1}}
        else:
            # The small deployments stay on the head, so that only the model replica is on the node that
            # dies (the ops collector's events, which this test reads, would restart empty with it).
            deployment["ray_actor_options"]["resources"] = {HEAD_NODE_RESOURCE: 0.01}
    return config


class LightLoad(threading.Thread):
    """One short request at a time, recording (time, ok) for each."""

    def __init__(self, base_url: str, headers: dict):
        super().__init__(daemon=True)
        self.base_url = base_url
        self.headers = headers
        self.results: list[tuple[float, bool]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        while not self.stopping.is_set():
            try:
                ok = httpx.post(self.base_url + "/v1/chat/completions", json=body, headers=self.headers,
                                timeout=30).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.results.append((time.monotonic(), ok))
            time.sleep(0.3)


def wait_until(probe, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def ops_state(base_url: str, headers: dict) -> dict | None:
    try:
        r = httpx.get(base_url + "/ops/state", headers=headers, timeout=10)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def model_nodes(base_url: str, headers: dict) -> set[str]:
    state = ops_state(base_url, headers)
    return {r["node_id"] for r in state["model_replicas"]} if state else set()


def test_model_replica_moves_to_another_node_when_its_node_dies(tmp_path, artifact_dir):
    cluster = LocalCluster()
    timings = {}
    started = time.monotonic()
    try:
        cluster.start_node("head", num_cpus=2, head=True)
        cluster.wait_for_nodes(1)
        cluster.start_node("a", num_cpus=1, resources={"model_node": 1})
        node_a = cluster.node_id_with("model_node", cluster.wait_for_nodes(2))

        http_port = free_port()
        base_url = f"http://127.0.0.1:{http_port}"
        key, record = new_key("cluster-test", admin=True)  # admin: the test reads /ops/state
        FileKeyStore(tmp_path / "keys.json").write(record)
        auth = {"Authorization": f"Bearer {key}"}
        config_path = tmp_path / "serve_config.yaml"
        config_path.write_text(yaml.safe_dump(cluster_config(http_port, tmp_path / "keys.json")))
        deployed = cluster.serve("deploy", str(config_path))
        assert deployed.returncode == 0, deployed.stderr
        try:
            wait_until(lambda: _status(base_url + "/readyz") == 200, 240, "app ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; serve status:\n{cluster.serve('status').stdout}") from None
        timings["deployed_s"] = time.monotonic() - started
        assert wait_until(lambda: model_nodes(base_url, auth), 30, "model replica reports") == {node_a}

        cluster.start_node("b", num_cpus=1, resources={"model_node": 1})
        node_b = cluster.node_id_with("model_node", cluster.wait_for_nodes(3), exclude={node_a})

        load = LightLoad(base_url, auth)
        load.start()
        wait_until(lambda: sum(ok for _, ok in load.results) >= 3, 60, "requests served before the failure")
        killed_at = time.monotonic()
        cluster.nodes[1].kill()  # node A, with the model replica on it

        wait_until(lambda: model_nodes(base_url, auth) == {node_b}, 180, "model replica reporting from node B")
        timings["replica_moved_s"] = time.monotonic() - killed_at
        wait_until(lambda: [ok for t, ok in load.results if t > killed_at + timings["replica_moved_s"]][-3:] == [True] * 3,
                   60, "three requests in a row succeed after the move")
        timings["recovered_s"] = time.monotonic() - killed_at
        load.stopping.set()
        load.join(timeout=40)

        after = [ok for t, ok in load.results if t > killed_at]
        state = ops_state(base_url, auth)
        events = [(e["kind"], e.get("node_id")) for e in state["events"]]
        assert ("replica_gone", node_a) in events and ("replica_up", node_b) in events
        alive = {n["node_id"] for n in cluster.alive_nodes()}
        assert node_a not in alive and node_b in alive
        timings["requests_after_kill"] = f"{sum(after)} ok / {len(after)}"
        timings["total_s"] = time.monotonic() - started
        print("multi-node timings:", {k: round(v, 1) if isinstance(v, float) else v for k, v in timings.items()})
    finally:
        cluster.shutdown()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=15).status_code
    except httpx.HTTPError:
        return None
