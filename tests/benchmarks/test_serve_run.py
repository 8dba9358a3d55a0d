"""A short real benchmark run against the app: every output file, with figures that hang together."""

import json

import pytest

from benchmarks import serve as serve_bench
from benchmarks.report import write_outputs
from benchmarks.serve_status import InProcessStatus

from ..apps import token_for

pytestmark = pytest.mark.serve


def bench_args(base_url: str, *extra: str):
    return serve_bench.parse_args(["--url", base_url, "--api-key", token_for("benchmark"), "--max-tokens", "4",
                                   "--bucket-s", "1",
                                   "--sample-interval-s", "0.5", "--no-progress", *extra])


async def test_step_run_writes_json_markdown_and_plot_with_replica_samples(base_url, tmp_path):
    args = bench_args(base_url, "--profile", "step", "--stages", "1:1,3:2,1:1", "--slo", "ttft_ms=60000")
    report = await serve_bench.measure(args, base_url, InProcessStatus())
    paths = write_outputs(report, str(tmp_path), "step")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["step.json", "step.md", "step.png"]
    assert (tmp_path / "step.png").stat().st_size > 10_000

    saved = json.loads((tmp_path / "step.json").read_text())
    (phase,) = saved["phases"]
    summary = phase["summary"]
    assert summary["failed"] == 0 and summary["completed"] == len(saved["requests"]) >= 3
    assert all(r["output_tokens"] == 4 for r in saved["requests"])  # ignore_eos, counted by the server
    assert summary["total_output_tokens"] == 4 * summary["completed"]
    assert summary["goodput_rps"] == pytest.approx(summary["request_throughput_rps"])  # a 60 s TTFT SLO: all good
    labels = [s["label"] for s in phase["stages"]]  # stage 3 may see no new request on a slow machine
    assert labels[:2] == ["stage 1: 1 stream", "stage 2: 3 streams"] and labels[2:] in ([], ["stage 3: 1 stream"])
    samples = saved["serve_status"]["samples"]
    assert samples and all(s["replicas"]["ModelServer"].get("RUNNING", 0) >= 1 for s in samples)
    assert samples[0]["t_s"] < phase["end_s"]  # on the run's clock
    assert max(saved["time_series"]["in_flight"]) >= 2
    md = (tmp_path / "step.md").read_text()
    assert "stage 2: 3 streams" in md and "ModelServer running replicas" in md


async def test_multiturn_run_reports_ttft_and_history_by_turn(base_url, tmp_path):
    args = bench_args(base_url, "--profile", "multiturn", "--turns", "2", "--conversations", "2", "--user-tokens",
                      "24", "--think-time-s", "0.05")
    report = await serve_bench.measure(args, base_url)
    paths = write_outputs(report, str(tmp_path), "mt")
    assert (tmp_path / "mt_ttft_by_turn.png").exists() and len(paths) == 4
    assert report["serve_status"]["samples"] == [] and report["serve_status"]["note"]  # no source: degrades

    saved = json.loads((tmp_path / "mt.json").read_text())
    assert [p["label"] for p in saved["phases"]] == ["reuse_on", "reuse_off"]
    assert all(p["summary"]["completed"] == 4 for p in saved["phases"])
    history = saved["history_tokens_by_turn"]  # turn 2 sees turn 1's message and its 4-token reply
    assert len(history) == 2 and history[0] + 24 + 4 <= history[1]
    for mode in ("reuse_on", "reuse_off"):
        assert len(saved["ttft_by_turn_s"][mode]) == 2 and all(t > 0 for t in saved["ttft_by_turn_s"][mode])
    # The server reports cached prompt tokens: with reuse on, turn 2 reuses turn 1's KV; with
    # cache_prompt=false, nothing is reused.
    assert saved["hit_rate"]["reuse_on"]["cached_share_by_turn"][1] > 0.3
    assert saved["hit_rate"]["reuse_off"]["cached_token_share"] == 0
    assert saved["multiturn"]["history_turns_dropped_by_turn"] == [0, 0]
    assert saved["multiturn"]["replicas_per_conversation"]["reuse_on"] == 1.0  # from the done events


async def test_multiturn_run_through_previous_response_id_chains(base_url, tmp_path):
    args = bench_args(base_url, "--profile", "multiturn", "--api", "responses", "--turns", "3", "--conversations",
                      "2", "--user-tokens", "24", "--think-time-s", "0.05", "--reuse", "on")
    report = await serve_bench.measure(args, base_url)
    assert report["settings"]["api"] == "responses"
    (phase,) = report["phases"]
    assert phase["label"] == "reuse_on" and phase["summary"]["completed"] == 6 and phase["summary"]["failed"] == 0
    chains = {}
    for r in report["requests"]:
        assert r["response_id"].startswith("resp_") and r["output_tokens"] == 4
        chains.setdefault(r["conversation"], []).append(r)
    for turns in chains.values():  # each turn's prompt holds the one before: its message and reply
        assert [t["turn"] for t in turns] == [0, 1, 2]
        assert all(b["prompt_tokens"] >= a["prompt_tokens"] + 24 + 4 for a, b in zip(turns, turns[1:], strict=False))
    assert len(report["ttft_by_turn_s"]["reuse_on"]) == 3 and all(t > 0 for t in report["ttft_by_turn_s"]["reuse_on"])
    assert all(share > 0.3 for share in report["hit_rate"]["reuse_on"]["cached_share_by_turn"][1:])
