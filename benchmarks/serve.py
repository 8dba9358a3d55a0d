"""Closed-loop streaming load against any OpenAI-compatible endpoint.

    python -m benchmarks serve --url http://127.0.0.1:8000 --concurrency 1,32 --max-tokens 64 --json out.json

For each concurrency C, C clients each send ``--requests-per-client`` streaming chat requests back to
back. Per request: TTFT (send -> first content chunk), TPOT ((end - first) / (tokens - 1)) and
end-to-end latency; tokens come from the server's ``usage`` (``stream_options.include_usage``).
Aggregate: output tokens/s over the wall time of the level, and p50/p95 of each latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from .machine import describe_machine, int_list, run_cli

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle to a child.",
    "List some facts about the moon.",
]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    first = None
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage else 0
    return {"sent": sent, "ttft_s": (first or end) - sent, "e2e_s": end - sent, "tokens": tokens,
            "tpot_s": (end - first) / (tokens - 1) if first and tokens > 1 else None, "end": end}


async def run_level(client, model: str, concurrency: int, per_client: int, max_tokens: int) -> dict:
    errors: dict[str, int] = {}

    async def worker(i: int) -> list[dict]:
        out = []
        for j in range(per_client):
            try:
                out.append(await one_request(client, model, PROMPTS[(i + j) % len(PROMPTS)], max_tokens))
            except Exception as exc:  # noqa: BLE001 - counted by kind
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        return out

    started = time.perf_counter()
    results = [r for rs in await asyncio.gather(*[worker(i) for i in range(concurrency)]) for r in rs]
    wall = time.perf_counter() - started
    ttft = [r["ttft_s"] for r in results]
    tpot = [r["tpot_s"] for r in results if r["tpot_s"] is not None]
    e2e = [r["e2e_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency, "requests": len(results), "errors": errors, "wall_s": round(wall, 3),
        "output_tok_s": round(tokens / wall, 2), "request_per_s": round(len(results) / wall, 3),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p95_s": percentile(tpot, 95),
        "e2e_p50_s": percentile(e2e, 50), "mean_output_tokens": statistics.mean(r["tokens"] for r in results)
        if results else 0,
    }


async def run(args) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key, timeout=600)
    model = args.model or (await client.models.list()).data[0].id
    await one_request(client, model, PROMPTS[0], 4)  # warm the path
    levels = []
    for concurrency in args.concurrency:
        level = await run_level(client, model, concurrency, args.requests_per_client, args.max_tokens)
        print(json.dumps(level), file=sys.stderr, flush=True)
        levels.append(level)
    return {"benchmark": "serve", "url": args.url, "model": model, "max_tokens": args.max_tokens,
            "results": levels, "machine": describe_machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks serve", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="model id (default: the first from /v1/models)")
    parser.add_argument("--api-key", default="benchmark")
    parser.add_argument("--concurrency", type=int_list, default=[1, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    return run_cli(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
