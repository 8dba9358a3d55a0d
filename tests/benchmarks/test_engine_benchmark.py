"""The engine and cold-start benchmarks run end to end and report what their JSON promises (figures are
not judged here)."""

import json

import pytest

from benchmarks import coldstart
from benchmarks import engine as engine_bench


def test_engine_benchmark_writes_its_report(tmp_path, artifact_dir):
    out = tmp_path / "engine.json"
    assert engine_bench.main(["--model", artifact_dir, "--batch", "1,2", "--max-tokens", "4", "--threads", "2",
                              "--cold-start-repeats", "1", "--device", "cpu", "--hf-generate", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert report["limits"]["matmul_peak_gflop_s"] > 0 and report["limits"]["memory_read_gb_s"] > 0
    for r in report["results"]:
        assert r["raw_decode_tok_s"] > 0 and r["engine_tok_s"] > 0 and r["engine_ttft_p50_s"] > 0
        assert r["completion_tokens"] == 4 * r["batch"]  # ignore_eos: exactly max_tokens each
        assert abs(r["ratio"] - r["engine_tok_s"] / r["raw_decode_tok_s"]) < 0.01
        roof = r["roofline_raw"]
        assert roof["step_ms"] == pytest.approx(1000 * r["batch"] / r["raw_decode_tok_s"], rel=0.01)
        assert roof["gflop_s"] == pytest.approx(roof["gflop_per_step"] / roof["step_ms"] * 1000, rel=0.02)
        assert roof["gflop_s_share_of_peak"] == pytest.approx(roof["gflop_s"] / report["limits"]["matmul_peak_gflop_s"],
                                                               rel=0.02, abs=6e-4)  # reported to 3 decimals
        assert roof["weight_mb_per_step"] > 200  # SmolLM2-135M: every matrix read once per step
    # Twice the rows: twice the work per step, the same weights.
    one, two = (r["roofline_raw"] for r in report["results"])
    assert two["gflop_per_step"] == pytest.approx(2 * one["gflop_per_step"], rel=0.01)
    assert two["weight_mb_per_step"] == one["weight_mb_per_step"]
    assert report["peak_rss_mb"] > 100 and report["machine"]["cpu_count"] >= 1
    (cold,) = report["cold_start"]["runs"]
    assert cold["ready_s"] > cold["start_s"] > 0 and cold["warmup_s"] > 0
    assert cold["dtype"] == report["dtype"] and cold["device"] == report["device"] == "cpu"
    assert cold["capture_s"] == 0 and report["cuda_graphs"] is None  # no CUDA graphs on CPU
    for r in report["results"]:  # transformers' generate at the same batch sizes
        assert r["hf_generate_tok_s"] > 0
        assert r["engine_vs_hf_generate"] == pytest.approx(r["engine_tok_s"] / r["hf_generate_tok_s"], rel=0.01)


def test_engine_benchmark_accepts_the_gpu_options(monkeypatch):
    captured = {}
    monkeypatch.setattr(engine_bench, "run_cli", lambda p, run, argv: captured.update(vars(p.parse_args(argv))) or 0)
    engine_bench.main(["--device", "cuda", "--batch", "1,32,128", "--max-seq-len", "2048", "--hf-generate"])
    assert captured["batch"] == [1, 32, 128] and captured["device"] == "cuda" and captured["hf_generate"]


def test_cold_start_of_a_missing_artifact_fails_with_the_childs_error(tmp_path):
    with pytest.raises(RuntimeError, match="not found"):
        coldstart.cold_start({"model": str(tmp_path / "missing.gguf")})
