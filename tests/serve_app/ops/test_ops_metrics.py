"""Operating the app: /ops/state from the collector, and the Prometheus metrics on Ray's endpoint."""

import asyncio
import json
import time

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from serve_app.metrics import METRIC_NAMES
from tests.cluster.test_configs import dashboard_metric_names

from ...apps import TEST_ARGS
from ..helpers import as_admin, as_user, ws_connect, ws_until

pytestmark = pytest.mark.serve

MODEL = "smollm2-135m-instruct"


def complete(base_url, content="Say hi.", max_tokens=8) -> dict:
    r = httpx.post(base_url + "/v1/chat/completions", timeout=120, headers=as_user(),
                   json={"model": MODEL, "messages": [{"role": "user", "content": content}],
                         "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(probe, timeout_s=30.0, period_s=0.5):
    """Call ``probe`` until it returns something truthy; return that, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s; last value {value!r}")
        time.sleep(period_s)


def scrape(metrics_url) -> list[tuple[str, dict, float]]:
    text = httpx.get(metrics_url, timeout=10).text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples, name, **labels) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def test_ops_state_shows_every_deployment_and_every_model_replica(base_url):
    usage = complete(base_url)["usage"]

    def ready():
        state = httpx.get(base_url + "/ops/state", timeout=10, headers=as_admin()).json()
        return state if state["totals"]["ttft_samples"] >= 1 and state["totals"]["tokens_per_s"] > 0 else None

    state = wait_for(ready)
    deployments = {d["name"]: d for d in state["deployments"]}
    assert {"Ingress", "DialogueState", "ModelServer", "OpsCollector"} <= set(deployments)
    assert all(d["status"] == "HEALTHY" and d["running_replicas"] >= 1 for d in deployments.values())
    rows = state["model_replicas"]
    assert len(rows) == deployments["ModelServer"]["running_replicas"]
    alive_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert all(r["node_id"] in alive_nodes and r["loop_alive"] and r["report_age_s"] < 5 for r in rows)
    assert sum(r["tokens_generated"] for r in rows) >= usage["completion_tokens"]
    assert 0 < state["totals"]["ttft_p50_s"] <= state["totals"]["ttft_p95_s"] < 60
    assert any(e["kind"] == "replica_up" and e["replica"] in {r["replica"] for r in rows} for e in state["events"])
    assert len(state["series"]["tokens_per_s"]) == len(state["series"]["start_s"]) > 0


async def test_model_replica_stats_match_the_ops_rows(base_url, model_handle):
    replica = (await model_handle.stats.remote())["replica"]
    state = httpx.get(base_url + "/ops/state", timeout=10, headers=as_admin()).json()
    assert replica in [r["replica"] for r in state["model_replicas"]]


def test_metrics_are_exported_with_serve_labels(base_url, metrics_url):
    before = scrape(metrics_url)
    usage = complete(base_url, max_tokens=12)["usage"]
    bad = httpx.post(base_url + "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
                     headers=as_user())
    assert bad.status_code == 404

    async def cancel_a_reply():
        async with ws_connect(base_url) as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws_until(ws, "session")
            await ws.send(json.dumps({"type": "message", "content": "Write a very long poem.", "max_tokens": 400}))
            await ws_until(ws, "delta")
            await ws.send(json.dumps({"type": "cancel"}))
            done, _ = await ws_until(ws, "done")
            assert done["finish_reason"] == "cancelled"

    asyncio.run(cancel_a_reply())
    model = {"application": "chat", "deployment": "ModelServer"}

    def exported():
        now = scrape(metrics_url)
        grew = (
            total(now, "ray_chatserve_ttft_seconds_count", **model) >= total(before, "ray_chatserve_ttft_seconds_count", **model) + 2
            and total(now, "ray_chatserve_generated_tokens_total", **model)
            >= total(before, "ray_chatserve_generated_tokens_total", **model) + usage["completion_tokens"]
            and total(now, "ray_chatserve_requests_cancelled_total", **model)
            > total(before, "ray_chatserve_requests_cancelled_total", **model)
            and total(now, "ray_chatserve_errors_total", deployment="Ingress", status="404", code="model_not_found")
            > total(before, "ray_chatserve_errors_total", deployment="Ingress", status="404", code="model_not_found")
        )
        return now if grew else None

    samples = wait_for(exported, timeout_s=45)
    names = {n for n, _, _ in samples}
    for name, (kind, _) in METRIC_NAMES.items():
        if name.startswith(("chatserve_engine_", "chatserve_prefix_cache_")) or kind == "histogram":
            exported_name = f"ray_{name}_total" if kind == "counter" else f"ray_{name}_count" if kind == "histogram" else f"ray_{name}"
            assert exported_name in names, exported_name
    # Values, not just names: the engine gauges carry this app's configuration, with a replica label.
    budget = [(lab, v) for n, lab, v in samples if n == "ray_chatserve_engine_kv_budget_tokens"]
    assert budget and all(v == TEST_ARGS["model"]["kv_budget_tokens"] and lab["replica"] for lab, v in budget)
    assert total(samples, "ray_chatserve_time_per_output_token_seconds_count", **model) >= 1
    assert "ray_chatserve_websocket_connections" in names and "ray_chatserve_active_sessions" in names
    # Serve's own metrics come from the same endpoint (the Grafana dashboard uses both).
    assert total(samples, "ray_serve_deployment_replica_healthy", deployment="ModelServer") >= 1
    # Every metric the Grafana dashboard queries is really exported, with the `application` label its
    # queries filter on (rejections only appear once a request has been refused).
    with_app = {n for n, lab, _ in samples if lab.get("application") == "chat"}
    missing = dashboard_metric_names() - with_app - {"ray_chatserve_rejections_total"}
    assert not missing, f"dashboard metrics not exported with application=chat: {sorted(missing)}"
