"""In-process engine benchmark: the engine's throughput against the raw decode ceiling.

    python -m benchmarks.engine --batch 1,32 --max-tokens 64 --json out.json

For each batch size B it measures (a) the raw decode ceiling: the model's forward alone at batch B
with a Hugging Face KV cache, one token per sequence per step, no scheduling, sampling or
detokenization; (b) the engine serving B concurrent requests of ``--max-tokens`` output tokens each
(EOS ignored so every request produces exactly that many): output tokens/s over the whole run (prompt
reading included), tokens/s over the decode phase only, and time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import torch

from engines.artifacts import DEFAULT_ARTIFACT_DIR
from engines.config import EngineConfig
from engines.protocol import GenerationRequest, SamplingParams
from engines.registry import create_engine

from .machine import describe_machine, int_list, peak_rss_mb, run_cli

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle to a child.",
    "List some facts about the moon.",
]


def raw_decode_tok_s(model, prompt_ids: list[int], batch: int, steps: int) -> float:
    """Forward passes only: prefill once, then ``steps`` decode steps at batch ``batch``."""
    from transformers import DynamicCache

    with torch.inference_mode():
        ids = torch.tensor([prompt_ids] * batch)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return batch * steps / (time.perf_counter() - start)


async def engine_run(engine, batch: int, max_tokens: int) -> dict:
    async def one(i: int) -> dict:
        request = GenerationRequest(
            messages=({"role": "user", "content": PROMPTS[i % len(PROMPTS)]},),
            sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        )
        sent = time.perf_counter()
        first = None
        async for delta in engine.generate(request):
            if first is None and delta.token_ids:
                first = time.perf_counter()
            if delta.finish_reason:
                return {"sent": sent, "first": first, "end": time.perf_counter(),
                        "tokens": delta.usage.completion_tokens}
        raise RuntimeError("stream ended without a finish")

    results = await asyncio.gather(*[one(i) for i in range(batch)])
    start = min(r["sent"] for r in results)
    end = max(r["end"] for r in results)
    last_first = max(r["first"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    decode_tokens = tokens - batch
    ttfts = sorted(r["first"] - r["sent"] for r in results)
    return {
        "engine_tok_s": tokens / (end - start),
        "engine_decode_tok_s": decode_tokens / (end - last_first) if end > last_first else None,
        "engine_ttft_p50_s": statistics.median(ttfts),
        "engine_ttft_max_s": ttfts[-1],
        "completion_tokens": tokens,
        "wall_s": end - start,
    }


async def run(args) -> dict:
    config = EngineConfig(model=args.model, num_threads=args.threads, max_running_seqs=max(args.batch),
                          kv_budget_tokens=args.kv_budget_tokens, prefix_cache_tokens=0)
    engine = create_engine(config)
    engine.start()
    prompt_ids = engine.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])
    # Warm up both paths so first-call costs are not measured.
    raw_decode_tok_s(engine.model, prompt_ids, 1, 4)
    await engine_run(engine, 2, 8)
    results = []
    for batch in args.batch:
        raw = raw_decode_tok_s(engine.model, prompt_ids, batch, args.max_tokens)
        served = await engine_run(engine, batch, args.max_tokens)
        stats = engine.stats()
        results.append({
            "batch": batch,
            "raw_decode_tok_s": round(raw, 1),
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in served.items()},
            "ratio": round(served["engine_tok_s"] / raw, 3),
            "decode_ratio": round(served["engine_decode_tok_s"] / raw, 3) if served["engine_decode_tok_s"] else None,
            "engine_steps_total": stats.steps,
        })
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    kv = engine.kv
    engine.shutdown()
    return {
        "benchmark": "engine",
        "model": args.model,
        "max_tokens": args.max_tokens,
        "results": results,
        "kv": {"budget_tokens": config.kv_budget_tokens, "bytes_per_token": kv.bytes_per_token,
               "budget_mb": round(config.kv_budget_tokens * kv.bytes_per_token / 2**20, 1)},
        "load_seconds": round(engine.load_seconds, 3),
        "peak_rss_mb": peak_rss_mb(),
        "machine": describe_machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_ARTIFACT_DIR))
    parser.add_argument("--batch", type=int_list, default=[1, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--kv-budget-tokens", type=int, default=32768)
    return run_cli(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
