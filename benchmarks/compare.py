"""Side by side: the phases of several ``benchmarks serve`` reports in one markdown table.

    python -m benchmarks compare benchmarks/results/steady.json benchmarks/results/baseline_steady.json

Rows are ``<report name> / <phase>``, with the columns of each report's own summary table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .report import summary_table


def compare(paths: list[str]) -> str:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    rows = [(f"{r['name']} / {phase['label']}", phase["summary"]) for r in reports for phase in r["phases"]]
    slo = next((r["slo"] for r in reports if r["slo"]), {})
    targets = [f"- {r['name']}: {r['target']['url']} ({r['profile']}, {json.dumps(r['settings'])})" for r in reports]
    return "\n".join(summary_table(rows, slo) + [""] + targets) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="JSON reports of python -m benchmarks serve")
    print(compare(parser.parse_args(argv).reports), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
