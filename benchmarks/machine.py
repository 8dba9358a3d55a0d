"""Shared by the benchmarks: what machine they ran on, and how they write their JSON report."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import resource


def describe_machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gb": mem_gb,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def emit_report(report: dict, path: str | None, echo: bool = True) -> None:
    """Print the report as JSON (unless ``echo`` is off) and, when ``path`` is given, write it there too."""
    text = json.dumps(report, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    if echo:
        print(text)


def int_list(text: str) -> list[int]:
    """argparse type for ``1,8,32``."""
    return [int(x) for x in text.split(",")]


def float_list(text: str) -> list[float]:
    """argparse type for ``0.5,1,2``."""
    return [float(x) for x in text.split(",")]


def run_cli(parser, run, argv: list[str] | None) -> int:
    """Add ``--json``, parse ``argv``, run the async benchmark ``run(args)`` and emit its report."""
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    emit_report(asyncio.run(run(args)), args.json)
    return 0
