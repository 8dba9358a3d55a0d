"""Report files from a synthetic run: markdown rows, plots, and the side-by-side table."""

import json

from benchmarks.compare import compare
from benchmarks.metrics import RequestRecord, Slo, summarize, time_series
from benchmarks.report import write_outputs


def synthetic_report(name: str, latency_s: float, slo: Slo) -> dict:
    records = [RequestRecord(start_s=i, end_s=i + latency_s, chunk_times_s=[i + 0.1 * latency_s, i + latency_s],
                             output_tokens=2, prompt_tokens=5, phase="2 streams") for i in range(6)]
    records.append(RequestRecord(start_s=1, end_s=1.5, error="http_503", error_detail="overloaded", phase="2 streams"))
    end = max(r.end_s for r in records)
    samples = [{"t_s": t, "replicas": {"ModelServer": {"RUNNING": 1 + (t > 3)}}, "target_replicas": {"ModelServer": 2},
                "metrics": {"ongoing": {"ModelServer": 2.0}}} for t in range(8)]
    return {"name": name, "profile": "concurrency", "target": {"url": "http://x", "model": "m"},
            "settings": {"max_tokens": 2}, "slo": slo.to_json(),
            "phases": [{"label": "2 streams", "start_s": 0.0, "end_s": end, "summary": summarize(records, end, slo)}],
            "time_series": time_series(records, end, 1.0),
            "serve_status": {"interval_s": 1.0, "samples": samples}, "machine": {"cpu_count": 2}}


def test_outputs_from_a_synthetic_run(tmp_path):
    report = synthetic_report("fast", 1.0, Slo.parse("ttft_ms=500"))
    paths = write_outputs(report, str(tmp_path), "fast")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["fast.json", "fast.md", "fast.png"]
    assert json.loads((tmp_path / "fast.json").read_text())["phases"][0]["summary"]["completed"] == 6
    md = (tmp_path / "fast.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 2 streams"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["6", "http_503: 1"] and cells[5] == "100"  # TTFT p50 = 0.1 s
    assert cells[-1] == "1.00 (86%)"  # 6 good of 7 requests, over 6 s
    assert "`http_503`: overloaded" in md and "min 1, max 2" in md
    assert (tmp_path / "fast.png").stat().st_size > 10_000


def test_compare_puts_reports_side_by_side(tmp_path):
    for name, latency in (("ours", 1.0), ("baseline", 4.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps(synthetic_report(name, latency, Slo())))
    table = compare([str(tmp_path / "ours.json"), str(tmp_path / "baseline.json")])
    rows = [line for line in table.splitlines() if line.startswith("| ours") or line.startswith("| baseline")]
    assert [r.split("|")[1].strip() for r in rows] == ["ours / 2 streams", "baseline / 2 streams"]
    assert rows[0].split("|")[6].strip() == "100" and rows[1].split("|")[6].strip() == "400"
