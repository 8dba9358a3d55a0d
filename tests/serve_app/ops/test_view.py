"""The ops view's bookkeeping, without Serve: rolling windows, rates, events, stale replicas."""

from dataclasses import replace

from engines.protocol import EngineStats
from serve_app.ops.view import DeploymentState, OpsView, RollingWindow, percentile
from serve_app.schemas import ReplicaReport

STATS = EngineStats(running=0, waiting=0, max_running=32, kv_budget_tokens=1000, kv_allocated_tokens=0, kv_bytes=0,
                    steps=0, tokens_generated=0, requests_finished=0, requests_aborted=0, last_batch_size=0,
                    loop_alive=True, seconds_since_last_step=0.0)


def report(replica="r1", node="n1", ttft=(), **stats) -> ReplicaReport:
    return ReplicaReport(replica=replica, deployment="ModelServer", node_id=node, pid=1,
                         stats=replace(STATS, **stats), ttft_samples_s=tuple(ttft))


def state(name="ModelServer", running=1, status="HEALTHY", trigger="CONFIG_UPDATE_COMPLETED") -> DeploymentState:
    return DeploymentState(name=name, status=status, status_trigger=trigger, message="",
                           replica_states={"RUNNING": running})


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 95) == 95.0


def test_rolling_window_forgets_old_values_and_buckets():
    window = RollingWindow(window_s=60, bucket_s=10)
    window.add(1.0, now_s=1000)
    window.add(2.0, now_s=1035)
    assert window.values(now_s=1040) == [1.0, 2.0]
    assert window.values(now_s=1040, last_s=10) == [2.0]
    assert window.values(now_s=1061) == [2.0]  # 1.0 is older than the window
    buckets = window.buckets(now_s=1061)
    assert len(buckets) == 6 and [v for _, v in buckets if v] == [[2.0]]


def test_tokens_per_second_from_counter_increases_across_replicas():
    view = OpsView(rate_window_s=60)
    view.add_report(report("a", tokens_generated=100), now_s=0)  # first report: a baseline, not a rate
    view.add_report(report("b", tokens_generated=50), now_s=0)
    for t in range(1, 11):
        view.add_report(report("a", tokens_generated=100 + 20 * t), now_s=t)
        view.add_report(report("b", tokens_generated=50 + 10 * t), now_s=t)
    totals = view.snapshot(now_s=10)["totals"]
    assert totals["tokens_per_s"] == 30.0
    assert totals["model_replicas"] == 2


def test_restarted_engine_counts_from_zero():
    view = OpsView()
    view.add_report(report("a", tokens_generated=500), now_s=0)
    view.add_report(report("a", tokens_generated=20), now_s=1)  # counter went down: a new engine
    assert sum(view.increases["tokens_generated"].values(now_s=1)) == 20


def test_ttft_percentiles_and_cache_hit_rate_over_the_window():
    view = OpsView(window_s=300)
    view.add_report(report(ttft=[0.1, 0.2], prefix_cache_hits=0, prefix_cache_misses=0), now_s=0)
    view.add_report(report(ttft=[0.3, 0.4, 5.0], prefix_cache_hits=3, prefix_cache_misses=1), now_s=1)
    totals = view.snapshot(now_s=2)["totals"]
    assert totals["ttft_samples"] == 5 and totals["ttft_p50_s"] == 0.3 and totals["ttft_p95_s"] == 5.0
    assert totals["prefix_cache_hit_rate"] == 0.75
    later = view.snapshot(now_s=400)["totals"]  # everything fell out of the window (the replica went quiet too)
    assert later["ttft_samples"] == 0 and later["ttft_p50_s"] is None and later["prefix_cache_hit_rate"] is None


def test_scaling_and_status_changes_become_events():
    view = OpsView()
    view.add_status([state(running=1)], now_s=0)
    view.add_status([state(running=1)], now_s=2)
    view.add_status([state(running=2, status="UPSCALING", trigger="AUTOSCALING")], now_s=4)
    events = view.snapshot(now_s=5)["events"]
    scaled = [e for e in events if e["kind"] == "scaled"]
    assert scaled == [{"at_s": 4, "kind": "scaled", "deployment": "ModelServer", "from_replicas": 1,
                       "to_replicas": 2, "trigger": "AUTOSCALING"}]
    assert [e["to_status"] for e in events if e["kind"] == "status"] == ["UPSCALING"]


def test_silent_replica_is_dropped_with_an_event_and_a_new_one_appears():
    view = OpsView(stale_after_s=5)
    view.add_report(report("old", node="node-a", running=3), now_s=0)
    view.add_report(report("new", node="node-b"), now_s=8)
    snap = view.snapshot(now_s=8)
    assert [r["replica"] for r in snap["model_replicas"]] == ["new"]
    assert snap["totals"]["requests_running"] == 0  # the dead replica's sequences no longer count
    kinds = [(e["kind"], e["replica"], e["node_id"]) for e in reversed(snap["events"])]
    assert kinds == [("replica_up", "old", "node-a"), ("replica_up", "new", "node-b"), ("replica_gone", "old", "node-a")]
