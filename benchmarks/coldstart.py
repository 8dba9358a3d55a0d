"""Cold start: a fresh process, from exec to a replica's "ready" (engine started and warmed up).

    python -m benchmarks coldstart --repeats 3 --json out.json

Each repeat spawns a new Python process that does what a model replica does before it is ready
(``serve_app``'s ModelServer): import the engine, start it from the artifact, run the same short
warm-up generation. The wall time is taken from spawning the process to the line it prints once
ready, so interpreter start and imports count. Load and warm-up as the child measured them are
reported too. ``--device cuda``: the replica's start includes sizing the KV cache from free GPU
memory and capturing the decode CUDA graphs (``capture_s``), with the artifact's GPU preparation
checked first (``python -m engines.build --device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from engines.artifacts import DEFAULT_ARTIFACT_DIR

from .machine import emit_report

CHILD = """
import asyncio, json, sys, time
from engines.config import EngineConfig
from engines.protocol import GenerationRequest, SamplingParams
from engines.registry import create_engine
config = json.loads(sys.argv[1])
engine = create_engine(EngineConfig(**config))
started = time.perf_counter()
engine.start()
start_s = time.perf_counter() - started
async def warm_up():
    request = GenerationRequest(messages=({"role": "user", "content": "Hello"},),
                                sampling=SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    return [d async for d in engine.generate(request)]
deltas = asyncio.run(warm_up())
assert deltas[-1].usage.completion_tokens == 4
print("READY " + json.dumps({"start_s": start_s, "load_s": engine.load_seconds,
                             "warmup_s": time.perf_counter() - started - start_s, "dtype": engine.dtype,
                             "device": str(engine.device), "capture_s": engine.capture_seconds}), flush=True)
engine.shutdown()
"""


def cold_start(config: dict, timeout_s: float = 120.0) -> dict:
    spawned = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.startswith("READY "):
                ready_s = time.perf_counter() - spawned
                return {"ready_s": round(ready_s, 3), **{k: (round(v, 3) if isinstance(v, float) else v)
                                                        for k, v in json.loads(line[6:]).items()}}
        raise RuntimeError(f"the child exited without getting ready:\n{child.stderr.read()[-3000:]}")
    finally:
        child.kill()
        child.wait(timeout_s)


def measure(model: str, dtype: str, threads: int | None, repeats: int, device: str = "auto", **engine) -> dict:
    config = {"model": model, "dtype": dtype, "num_threads": threads, "device": device, **engine}
    runs = []
    for _ in range(repeats):
        runs.append(cold_start(config))
        runs[-1]["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return {"config": config, "runs": runs, "ready_s_median": statistics.median(r["ready_s"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks coldstart", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_ARTIFACT_DIR))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-seq-len", type=int, default=None, help="on CUDA: the static KV cache's row length")
    parser.add_argument("--kv-budget-tokens", type=int, default=None)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    engine = {k: v for k, v in (("max_seq_len", args.max_seq_len), ("kv_budget_tokens", args.kv_budget_tokens))
              if v is not None}
    emit_report({"benchmark": "coldstart", **measure(args.model, args.dtype, args.threads, args.repeats, args.device,
                                                     **engine)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
