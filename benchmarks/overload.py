"""One client abandons far more replies than the model tier holds; does another client notice?

    python -m benchmarks overload --launch serve_config.yaml --out benchmarks/results
    python -m benchmarks overload --url http://127.0.0.1:8000 --api-key <an admin key>

With an admin key it makes two API keys with the deployment's default limits: the *abuser* starts
``--abandon-x`` times the engine's rows (``--rows``) in long replies (sessions API, ``ignore_eos``,
``--abuser-tokens`` each), each in a session of its own, reading only the status line before
hanging up; the *neighbour* meanwhile sends ``--neighbour-requests`` ordinary streaming chat
completions, one after the other. Reported: the abuser's statuses and how fast they came, the
neighbour's completions, TTFT and time per output token. Afterwards the abuser's replies still
running are cancelled through ``GET /v1/replies``. JSON and markdown in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx

from .client import Clock, chat_completion, make_http_client
from .launch import launch_app
from .machine import describe_machine
from .metrics import distribution


async def abandon(http: httpx.AsyncClient, max_tokens: int) -> tuple[int, float]:
    """Start a long reply in a fresh session and hang up after the status line: (status, seconds)."""
    started = time.perf_counter()
    created = await http.post("/v1/sessions", json={})
    if created.status_code != 201:
        return created.status_code, time.perf_counter() - started
    body = {"content": "Write a very long story about the sea.", "max_tokens": max_tokens, "ignore_eos": True}
    async with http.stream("POST", f"/v1/sessions/{created.json()['id']}/messages", json=body) as r:
        return r.status_code, time.perf_counter() - started


async def run(args, url: str, admin_key: str) -> dict:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60) as admin:
        keys = {}
        for who in ("abuser", "neighbour"):
            r = await admin.post("/v1/admin/keys", json={"user": f"{who}-{int(time.time())}", "name": "overload"})
            r.raise_for_status()
            keys[who] = r.json()["key"]
        model = (await admin.get("/v1/models")).json()["data"][0]["id"]
    clock = Clock()
    abuser = make_http_client(url, keys["abuser"])
    neighbour = make_http_client(url, keys["neighbour"])
    try:
        async def abuse():
            results = []
            for start in range(0, args.abandon_x * args.rows, args.abuse_concurrency):
                batch = range(start, min(start + args.abuse_concurrency, args.abandon_x * args.rows))
                results += await asyncio.gather(*[abandon(abuser, args.abuser_tokens) for _ in batch])
            return results

        async def be_a_neighbour():
            await asyncio.sleep(args.neighbour_delay_s)  # the abuser has filled its share by then
            return [await chat_completion(neighbour, clock, model, [{"role": "user", "content": f"Name a city, #{i}."}],
                                          args.neighbour_tokens) for i in range(args.neighbour_requests)]

        abused, served = await asyncio.gather(abuse(), be_a_neighbour())
        active = (await abuser.get("/v1/replies")).json()["data"]
        for reply in active:
            await abuser.post(reply["cancel_url"])
    finally:
        await abuser.aclose()
        await neighbour.aclose()
    ok = [r for r in served if r.ok]
    statuses = Counter(status for status, _ in abused)
    return {
        "machine": describe_machine(),
        "target": url,
        "setup": {k: getattr(args, k) for k in ("rows", "abandon_x", "abuser_tokens", "abuse_concurrency",
                                                "neighbour_requests", "neighbour_tokens")},
        "abuser": {"requests": len(abused), "statuses": dict(statuses),
                   "answer_s": distribution([s for _, s in abused]),
                   "answer_s_by_status": {str(code): distribution([s for c, s in abused if c == code])
                                          for code in statuses},
                   "still_running_at_end": len(active)},
        "neighbour": {"requests": len(served), "completed": len(ok),
                      "errors": dict(Counter(r.error for r in served if not r.ok)),
                      "ttft_s": distribution([r.ttft_s for r in ok]),
                      "tpot_s": distribution([r.tpot_s for r in ok if r.tpot_s is not None])},
    }


def markdown(report: dict) -> str:
    a, n = report["abuser"], report["neighbour"]
    ttft, tpot = n["ttft_s"] or {}, n["tpot_s"] or {}
    return "\n".join([
        "# Overload: one client abandons replies, another is served", "",
        f"Abuser: {a['requests']} replies started and abandoned ({report['setup']['abandon_x']}x "
        f"{report['setup']['rows']} engine rows); statuses {a['statuses']}; answered in p50 "
        f"{(a['answer_s'] or {}).get('p50', 0) * 1000:.0f} ms / p95 {(a['answer_s'] or {}).get('p95', 0) * 1000:.0f} ms.",
        f"Neighbour: {n['completed']} of {n['requests']} completions; TTFT p50 {ttft.get('p50', 0):.3f} s, "
        f"p95 {ttft.get('p95', 0):.3f} s; TPOT p50 {tpot.get('p50', 0) * 1000:.0f} ms.", ""])


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks overload", description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8000")
    where.add_argument("--launch", metavar="SERVE_CONFIG", help="start our app from this Serve config, stop it after")
    parser.add_argument("--api-key", help="an admin key of the target (--launch makes its own)")
    parser.add_argument("--rows", type=int, default=32, help="the engine's rows (max_running_seqs) per replica")
    parser.add_argument("--abandon-x", type=int, default=10, help="replies abandoned, as a multiple of --rows")
    parser.add_argument("--abuser-tokens", type=int, default=1500)
    parser.add_argument("--abuse-concurrency", type=int, default=32, help="abandoned replies started at once")
    parser.add_argument("--neighbour-requests", type=int, default=20)
    parser.add_argument("--neighbour-tokens", type=int, default=64)
    parser.add_argument("--neighbour-delay-s", type=float, default=2.0)
    parser.add_argument("--out", help="directory for <name>.json and <name>.md")
    parser.add_argument("--name", default="overload")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    async def measure(url: str, key: str) -> dict:
        return await run(args, url, key)

    if args.launch:
        with launch_app(args.launch) as app:
            report = asyncio.run(measure(app.url, args.api_key or app.api_key))
    else:
        if not args.api_key:
            raise SystemExit("--api-key: an admin key of the target is needed to make the two clients' keys")
        report = asyncio.run(measure(args.url, args.api_key))
    text = markdown(report)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (Path(args.out) / f"{args.name}.md").write_text(text)
    return 0
