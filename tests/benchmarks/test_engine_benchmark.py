"""The engine benchmark runs end to end and reports what its JSON promises (figures are not judged here)."""

import json

from benchmarks import engine as engine_bench


def test_engine_benchmark_writes_its_report(tmp_path, artifact_dir):
    out = tmp_path / "engine.json"
    assert engine_bench.main(["--model", artifact_dir, "--batch", "1,2", "--max-tokens", "4", "--threads", "2",
                              "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert r["raw_decode_tok_s"] > 0 and r["engine_tok_s"] > 0 and r["engine_ttft_p50_s"] > 0
        assert r["completion_tokens"] == 4 * r["batch"]  # ignore_eos: exactly max_tokens each
        assert abs(r["ratio"] - r["engine_tok_s"] / r["raw_decode_tok_s"]) < 0.01
    assert report["peak_rss_mb"] > 100 and report["machine"]["cpu_count"] >= 1
