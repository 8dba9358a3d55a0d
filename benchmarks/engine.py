"""In-process engine benchmark: the engine's throughput against the raw decode ceiling and the machine's limits.

    python -m benchmarks engine --batch 1,32 --max-tokens 64 --json out.json
    python -m benchmarks engine --device cuda --batch 1,32,128 --max-seq-len 2048 --kv-budget-tokens 1048576 \
        --hf-generate --json gpu.json

For each batch size B it measures (a) the raw decode ceiling: the runner's model forward alone at
batch B over a KV cache of the prompt's length, one token per sequence per step, no scheduling,
sampling or detokenization; (b) the engine serving B concurrent requests of ``--max-tokens`` output
tokens each (EOS ignored so every request produces exactly that many): output tokens/s over the whole
run (prompt reading included), tokens/s over the decode phase only, and time to first token.

How close to the machine's limits (``roofline``): a decode step at batch B does
``B * flops_per_token`` floating-point operations and reads every weight matrix once. From the decode
phase's step time it reports achieved GFLOP/s against a matmul peak measured here in the same dtype
and threads (a large square matmul), and weight GB/s against a measured memory read bandwidth (sum
of a 512 MiB tensor). Batch 1 is bound by the weight reads, batch 32 by the matmuls.

``--device cuda`` runs all of it on the GPU: the engine in its CUDA mode (preallocated KV cache, CUDA
graphs), the raw forward eagerly on the same weights (synchronized before the clock stops), the
matmul peak and bandwidth measured on the GPU. ``--hf-generate`` adds transformers' ``generate`` on
the same device and dtype at each batch size (the prompts left-padded to one batch, greedy,
``min_new_tokens`` = ``max_new_tokens`` so every row produces them all): ``hf_generate_tok_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import torch

from engines.artifacts import DEFAULT_ARTIFACT_DIR
from engines.config import EngineConfig
from engines.protocol import GenerationRequest, SamplingParams
from engines.registry import create_engine

from . import coldstart
from .machine import describe_machine, int_list, peak_rss_mb, run_cli

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle to a child.",
    "List some facts about the moon.",
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_decode_tok_s(engine, prompt_len: int, batch: int, steps: int) -> float:
    """The runner's forward alone: ``batch`` rows decoding from ``prompt_len`` for ``steps`` steps."""
    from engines.attention import AttentionMetadata, create_attention_backend
    from engines.kv_cache import KVCache

    runner, spec = engine.runner, engine.runner.spec
    # A KV cache of its own (the engine's loop owns the engine's), the same weights.
    kv = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, runner.dtype, runner.device, batch,
                 prompt_len + steps + 1)
    kv.reserve(batch, prompt_len + steps + 1, 0, 1 << 30)
    attention = create_attention_backend("torch", kv, spec.num_heads, spec.head_dim)
    device = runner.device
    rows = torch.arange(batch, device=device)
    with torch.inference_mode():
        synchronize(device)
        start = time.perf_counter()
        for step in range(steps):
            positions = torch.full((batch,), prompt_len + step, device=device)
            attention.prepare(AttentionMetadata((prompt_len + step + 1,) * batch, (), rows, positions))
            logits = runner.model.forward(torch.full((batch,), 42, device=device), positions, attention, rows)
            logits.argmax(-1).tolist()
        synchronize(device)
        elapsed = time.perf_counter() - start
    return batch * steps / elapsed


def profile_forward(engine, prompt_len: int, batch: int, steps: int = 8, rows: int = 15) -> str:
    """torch.profiler's top operators (self CPU time) over ``steps`` raw decode steps, as text."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        raw_decode_tok_s(engine, prompt_len, batch, steps)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def matmul_peak_gflop_s(dtype: torch.dtype, size: int = 2048, repeats: int = 5,
                        device: torch.device = torch.device("cpu")) -> float:
    if device.type == "cuda":
        size, repeats = 8192, 20
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def memory_read_gb_s(mib: int = 512, repeats: int = 5, device: torch.device = torch.device("cpu")) -> float:
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    x.sum()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    synchronize(device)
    return x.numel() * 4 * repeats / (time.perf_counter() - start) / 1e9


def hf_generate_tok_s(hf_model, prompt_ids: list[list[int]], max_tokens: int, pad_id: int) -> float:
    """transformers' ``generate`` on one left-padded batch of prompts: output tokens/s."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids], device=hf_model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=hf_model.device)
    with torch.inference_mode():
        synchronize(hf_model.device)
        start = time.perf_counter()
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                do_sample=False, pad_token_id=pad_id)
        synchronize(hf_model.device)
        elapsed = time.perf_counter() - start
    assert out.shape[1] - width == max_tokens
    return len(prompt_ids) * max_tokens / elapsed


def roofline(engine, batch: int, tok_s: float, context_len: int, peak_gflop_s: float, bandwidth_gb_s: float) -> dict:
    """Achieved rates of a decode step at ``batch`` rows running at ``tok_s`` tokens/s in total."""
    spec, model = engine.runner.spec, engine.runner.model
    step_s = batch / tok_s
    flops = batch * spec.flops_per_token(context_len)
    weight_bytes = model.matmul_parameters() * model.embed.element_size()
    return {
        "step_ms": round(step_s * 1000, 2),
        "gflop_per_step": round(flops / 1e9, 3),
        "gflop_s": round(flops / step_s / 1e9, 1),
        "gflop_s_share_of_peak": round(flops / step_s / 1e9 / peak_gflop_s, 3),
        "weight_mb_per_step": round(weight_bytes / 1e6, 1),
        "weight_gb_s": round(weight_bytes / step_s / 1e9, 2),
        "weight_gb_s_share_of_bandwidth": round(weight_bytes / step_s / 1e9 / bandwidth_gb_s, 3),
    }


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
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, num_threads=args.threads,
                          max_running_seqs=max(args.batch), kv_budget_tokens=args.kv_budget_tokens,
                          max_seq_len=args.max_seq_len, decode_mode=args.decode_mode, prefix_cache_tokens=0)
    engine = create_engine(config)
    engine.start()
    device = engine.device
    prompt_len = len(engine.apply_chat_template([{"role": "user", "content": PROMPTS[0]}]))
    peak = matmul_peak_gflop_s(engine.runner.dtype, device=device)
    bandwidth = memory_read_gb_s(device=device)
    hf_model = None
    if args.hf_generate:
        from engines.artifacts import load_model

        hf_model, _, _ = load_model(args.model, dtype=engine.dtype, device=str(device))
        hf_prompts = [engine.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
        pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else min(engine.eos_ids)
        hf_generate_tok_s(hf_model, hf_prompts[:1], 2, pad_id)  # warm-up
    # Warm up both paths so first-call costs are not measured.
    raw_decode_tok_s(engine, prompt_len, 1, 4)
    await engine_run(engine, 2, 8)
    results, profiles = [], []
    for batch in args.batch:
        raw = raw_decode_tok_s(engine, prompt_len, batch, args.max_tokens)
        served = await engine_run(engine, batch, args.max_tokens)
        stats = engine.stats()
        context = prompt_len + args.max_tokens // 2  # the mean length attended over during decode
        hf_tok_s = (hf_generate_tok_s(hf_model, [hf_prompts[i % len(hf_prompts)] for i in range(batch)],
                                      args.max_tokens, pad_id) if hf_model is not None else None)
        results.append({
            "batch": batch,
            "raw_decode_tok_s": round(raw, 1),
            "hf_generate_tok_s": round(hf_tok_s, 1) if hf_tok_s else None,
            "engine_vs_hf_generate": round(served["engine_tok_s"] / hf_tok_s, 3) if hf_tok_s else None,
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in served.items()},
            "ratio": round(served["engine_tok_s"] / raw, 3),
            "decode_ratio": round(served["engine_decode_tok_s"] / raw, 3) if served["engine_decode_tok_s"] else None,
            "engine_steps_total": stats.steps,
            "roofline_raw": roofline(engine, batch, raw, context, peak, bandwidth),
            "roofline_engine_decode": (roofline(engine, batch, served["engine_decode_tok_s"], context, peak, bandwidth)
                                       if served["engine_decode_tok_s"] else None),
        })
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        if args.profile_out:
            profiles.append(f"## batch {batch}: {args.max_tokens // 8} raw decode steps, context {prompt_len}\n\n"
                            f"```\n{profile_forward(engine, prompt_len, batch, args.max_tokens // 8)}```\n")
    kv = engine.kv
    kv_info = {"budget_tokens": engine.scheduler.kv_budget_tokens, "bytes_per_token": kv.bytes_per_token,
               "budget_mb": round(engine.scheduler.kv_budget_tokens * kv.bytes_per_token / 2**20, 1),
               "static": engine.static_decode, "plan": engine.runner.kv_plan.as_dict() if engine.runner.kv_plan else None}
    graphs = engine.runner.graph_report
    engine.shutdown()
    del hf_model
    if args.profile_out:
        with open(args.profile_out, "w") as f:
            f.write(f"# Where a decode step's time goes ({engine.dtype}, {torch.get_num_threads()} threads, "
                    f"load average {os.getloadavg()[0]:.2f})\n\n" + "\n".join(profiles))
    cold = (coldstart.measure(args.model, args.dtype, args.threads, args.cold_start_repeats, device=args.device)
            if args.cold_start_repeats else None)
    return {
        "benchmark": "engine",
        "model": args.model,
        "dtype": engine.dtype,
        "device": str(device),
        "cuda_graphs": graphs,
        "threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "prompt_tokens": prompt_len,
        "limits": {"matmul_peak_gflop_s": round(peak, 1), "matmul_peak_dtype": engine.dtype,
                   "memory_read_gb_s": round(bandwidth, 2)},
        "results": results,
        "kv": kv_info,
        "load_seconds": round(engine.load_seconds, 3),
        "cold_start": cold,
        "peak_rss_mb": peak_rss_mb(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "machine": describe_machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_ARTIFACT_DIR))
    parser.add_argument("--batch", type=int_list, default=[1, 32], help="concurrent requests, e.g. 1,32,128")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--decode-mode", default="auto", choices=["auto", "dynamic", "static"])
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="static decode (CUDA) preallocates max_seq_len per row: keep it small")
    parser.add_argument("--hf-generate", action="store_true",
                        help="also time transformers' generate at each batch size, same device and dtype")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--profile-out", help="write torch.profiler's top operators per batch size here (markdown)")
    parser.add_argument("--cold-start-repeats", type=int, default=3,
                        help="fresh processes timed from exec to ready (benchmarks/coldstart.py); 0: skip")
    parser.add_argument("--kv-budget-tokens", type=int, default=32768)
    return run_cli(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
