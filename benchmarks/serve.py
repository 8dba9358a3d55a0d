"""Serving benchmark against any OpenAI-compatible endpoint, ours included.

    python -m benchmarks serve --url http://127.0.0.1:8000 --profile concurrency --concurrency 1,8,32
    python -m benchmarks serve --launch serve_config.yaml --profile step --stages 1:30,32:90,1:90 --out DIR
    python -m benchmarks serve --launch serve_config.yaml --profile multiturn --turns 8 --json out.json
    python -m benchmarks serve --launch serve_config.yaml --profile multiturn --api responses --out DIR

Profiles (``profiles.py``): ``concurrency`` (closed loop, one phase per level), ``poisson`` (open
loop, one phase per rate), ``step`` (closed loop whose stream count changes by stage, one phase),
``multiturn`` (conversations through the sessions API, or ``--api responses``: chains of
``previous_response_id``; one phase with prefix reuse on and one with it off).
Metrics (``metrics.py``) follow vLLM's definitions, token counts come from the server's ``usage``.
With ``--launch`` (or ``--ray-dashboard`` for an app already running) Serve's replicas and queues are
sampled on the same clock (``serve_status.py``). Outputs (``report.py``): ``--out DIR`` gets
``<name>.json``, ``<name>.md`` and PNG plots; ``--json PATH`` writes the JSON alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import uuid
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .client import Clock, chat_completion, make_http_client
from .launch import launch_app
from .machine import describe_machine, emit_report, float_list, int_list
from .metrics import RequestRecord, Slo, multiturn_summary, summarize, time_series
from .profiles import ConcurrencySchedule, poisson_arrivals
from .report import write_outputs
from .runners import ChatWorkload, ConversationPlan, run_closed_loop, run_conversations, run_open_loop
from .serve_status import DashboardStatus, ServeSampler

PROFILES = ("concurrency", "poisson", "step", "multiturn")
REUSE_MODES = {"both": ("reuse_on", "reuse_off"), "on": ("reuse_on",), "off": ("reuse_off",)}

console = Console(stderr=True)


class RunProgress:
    """A rich progress bar per phase: elapsed time against the planned duration (or finished turns
    against planned turns), with the requests done and failed so far."""

    def __init__(self, clock: Clock, enabled: bool = True):
        self.clock = clock
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                            TimeElapsedColumn(), TextColumn("{task.fields[stats]}"), console=console,
                            disable=not enabled)
        self.task = None
        self.done = self.failed = 0
        self.counting_requests = False

    def __enter__(self) -> RunProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    @contextlib.asynccontextmanager
    async def phase(self, label: str, duration_s: float | None = None, total_requests: int | None = None):
        start, self.done, self.failed = self.clock.now(), 0, 0
        self.counting_requests = not duration_s
        self.task = self.bar.add_task(label, total=duration_s or total_requests, stats="")

        async def tick() -> None:
            while True:
                if duration_s:
                    self.bar.update(self.task, completed=min(duration_s, self.clock.now() - start))
                self.bar.update(self.task, stats=f"ok {self.done}  failed {self.failed}")
                await asyncio.sleep(0.5)

        ticker = asyncio.create_task(tick())
        try:
            yield self
        finally:
            ticker.cancel()
            self.bar.update(self.task, completed=duration_s or total_requests,
                            stats=f"ok {self.done}  failed {self.failed}")

    def on_done(self, record: RequestRecord) -> None:
        self.done += record.ok
        self.failed += not record.ok
        if self.counting_requests:
            self.bar.advance(self.task)


def phase_entry(label: str, records: list[RequestRecord], start_s: float, end_s: float, slo: Slo,
                by_stage: bool = False) -> dict:
    entry = {"label": label, "start_s": start_s, "end_s": end_s, "summary": summarize(records, end_s - start_s, slo)}
    if by_stage:
        stages = []
        for stage in dict.fromkeys(r.stage for r in records):
            mine = [r for r in records if r.stage == stage]
            first, last = min(r.start_s for r in mine), max(r.end_s for r in mine)
            stages.append({"label": stage, "start_s": first, "end_s": last,
                           "summary": summarize(mine, last - first, slo)})
        entry["stages"] = stages
    return entry


async def run_profile(args, http, clock: Clock, model: str, slo: Slo, progress: RunProgress) -> tuple[list, list, dict]:
    """Run the chosen profile's phases; returns (phases, records, multi-turn summary or {})."""
    phases, records = [], []
    work = ChatWorkload(model=model, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)

    async def one_phase(label: str, run, duration_s=None, total_requests=None, by_stage=False) -> list:
        async with progress.phase(label, duration_s, total_requests):
            start = clock.now()
            mine = await run()
            end = clock.now()
        phases.append(phase_entry(label, mine, start, end, slo, by_stage))
        records.extend(mine)
        return mine

    if args.profile == "concurrency":
        for streams in args.concurrency:
            schedule = ConcurrencySchedule.steady(streams, args.duration_s)
            await one_phase(f"{streams} streams", lambda s=schedule, n=streams: run_closed_loop(
                http, clock, work, s, f"{n} streams", progress.on_done), duration_s=args.duration_s)
    elif args.profile == "step":
        schedule = ConcurrencySchedule.parse(args.stages)
        label = "step " + "→".join(str(s.streams) for s in schedule.stages)
        await one_phase(label, lambda: run_closed_loop(http, clock, work, schedule, label, progress.on_done),
                        duration_s=schedule.duration_s, by_stage=True)
    elif args.profile == "poisson":
        for rate in args.rate_rps:
            arrivals = poisson_arrivals(rate, args.duration_s, seed=args.seed)
            label = f"poisson {rate:g} req/s"
            await one_phase(label, lambda a=arrivals, lb=label: run_open_loop(http, clock, work, a, lb,
                                                                              progress.on_done),
                            duration_s=args.duration_s)
    else:
        plan = ConversationPlan(conversations=args.conversations, turns=args.turns, user_tokens=args.user_tokens,
                                reply_tokens=args.max_tokens, think_time_s=args.think_time_s, seed=args.seed,
                                api=args.api, model=model)
        modes = REUSE_MODES[args.reuse]
        for mode in modes:
            await one_phase(mode, lambda m=mode: run_conversations(
                http, clock, plan, reuse=(m == "reuse_on"), phase=m, tag=m, on_done=progress.on_done),
                total_requests=plan.conversations * plan.turns)
        return phases, records, multiturn_summary(records, plan.turns, list(modes))
    return phases, records, {}


async def measure(args, url: str, status_source=None, launched_config: str | None = None) -> dict:
    """Warm up, run the profile while sampling Serve's status from ``status_source`` (a
    ``DashboardStatus`` or ``InProcessStatus``; None for a plain endpoint), and build the report."""
    slo = Slo.parse(args.slo)
    clock = Clock()
    async with make_http_client(url, args.api_key, f"benchmark-{uuid.uuid4().hex[:8]}") as http:
        model = args.model or (await http.get("/v1/models")).json()["data"][0]["id"]
        warm = await chat_completion(http, clock, model, [{"role": "user", "content": "Hello"}], 4)
        if not warm.ok:
            raise SystemExit(f"warm-up request to {url} failed: {warm.error}")
        clock = Clock()  # time 0 of the report: the load starts now

        sampler = None
        note = "no Ray dashboard given (--launch or --ray-dashboard): the target is treated as a plain endpoint"
        if status_source is not None:
            sampler = ServeSampler(status_source, args.app_name, clock, args.sample_interval_s)
            if not await sampler.probe():
                note, sampler = sampler.note, None
        sampling = asyncio.create_task(sampler.run()) if sampler else None
        try:
            with RunProgress(clock, enabled=not args.no_progress) as progress:
                phases, records, multiturn = await run_profile(args, http, clock, model, slo, progress)
        finally:
            if sampler:
                sampler.stop()
                await sampling
            if status_source is not None:
                await status_source.close()

    end_s = max([p["end_s"] for p in phases] + [0.0])
    report = {
        "benchmark": "serve",
        "name": args.name,
        "profile": args.profile,
        "target": {"url": url, "model": model, "launched_config": launched_config,
                   "serve_config": yaml.safe_load(Path(launched_config).read_text()) if launched_config else None},
        "settings": settings_of(args),
        "slo": slo.to_json(),
        "phases": phases,
        "time_series": time_series(records, end_s, args.bucket_s),
        "serve_status": sampler.to_json() if sampler else {"note": note, "samples": []},
        "machine": describe_machine(),
        "requests": [r.to_json() for r in records],
    }
    if multiturn:
        report["multiturn"] = multiturn
        # Top-level keys for readers who want the headline curves only.
        report["ttft_by_turn_s"] = multiturn["ttft_by_turn_s"]
        report["history_tokens_by_turn"] = multiturn["history_tokens_by_turn"]
        report["hit_rate"] = multiturn["hit_rate"]
    return report


def settings_of(args) -> dict:
    keys = {"concurrency": ["concurrency", "duration_s"], "step": ["stages"], "poisson": ["rate_rps", "duration_s", "seed"],
            "multiturn": ["conversations", "turns", "user_tokens", "think_time_s", "reuse", "seed", "api"]}[args.profile]
    return {k: getattr(args, k) for k in ["max_tokens", "ignore_eos", *keys]}


async def run(args) -> dict:
    if args.launch:
        with launch_app(args.launch, num_cpus=args.num_cpus, log=lambda m: console.print(m, style="dim")) as app:
            args.api_key = args.api_key or app.api_key
            return await measure(args, app.url, DashboardStatus(app.dashboard_url), args.launch)
    return await measure(args, args.url, DashboardStatus(args.ray_dashboard) if args.ray_dashboard else None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = p.add_argument_group("target")
    where = target.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of an OpenAI-compatible server")
    where.add_argument("--launch", metavar="SERVE_CONFIG", help="start our app from this Serve config, stop it after")
    target.add_argument("--model", help="model id (default: the first of /v1/models)")
    target.add_argument("--api-key", help="sent as a bearer token")
    target.add_argument("--num-cpus", type=int, help="--launch: CPUs of the Ray node (default: all)")
    target.add_argument("--ray-dashboard", help="Ray dashboard URL of a running app, to sample its replicas")
    target.add_argument("--app-name", default="chat", help="Serve application to sample")
    target.add_argument("--sample-interval-s", type=float, default=1.0)

    load = p.add_argument_group("load")
    load.add_argument("--profile", choices=PROFILES, default="concurrency")
    load.add_argument("--concurrency", type=int_list, default=[1, 8, 32], help="concurrency: streams per level")
    load.add_argument("--duration-s", type=float, default=30.0, help="concurrency/poisson: seconds per level")
    load.add_argument("--rate-rps", type=float_list, default=[1.0], help="poisson: mean request rates")
    load.add_argument("--stages", default="1:30,32:90,1:90", help="step: STREAMS:SECONDS,...")
    load.add_argument("--max-tokens", type=int, help="output tokens per request (default 64; multiturn: 96 per reply)")
    load.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                      help="let replies stop at EOS (default: exactly --max-tokens each)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--turns", type=int, default=8, help="multiturn: turns per conversation")
    load.add_argument("--conversations", type=int, default=4, help="multiturn: conversations in parallel")
    load.add_argument("--user-tokens", type=int, default=90, help="multiturn: tokens per user message (about)")
    load.add_argument("--think-time-s", type=float, default=1.0, help="multiturn: pause between turns")
    load.add_argument("--api", choices=("sessions", "responses"), default="sessions",
                      help="multiturn: the sessions API, or the Responses API chaining previous_response_id")
    load.add_argument("--reuse", choices=REUSE_MODES, default="both",
                      help="multiturn: prefix-KV reuse on, off (cache_prompt=false) or both, one after the other")

    out = p.add_argument_group("output")
    out.add_argument("--slo", help="goodput SLOs, e.g. ttft_ms=1000,tpot_ms=200,e2e_ms=20000")
    out.add_argument("--out", help="directory for <name>.json, <name>.md and the PNG plots")
    out.add_argument("--name", default=None, help="file name stem (default: the profile)")
    out.add_argument("--bucket-s", type=float, default=5.0, help="time-series window of the plots")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--json", help="write the JSON report here too")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    args.name = args.name or args.profile
    if args.max_tokens is None:  # multiturn: 8 turns of ~90 + 96 tokens reach ~1500 history tokens
        args.max_tokens = 96 if args.profile == "multiturn" else 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Slo.parse(args.slo)  # fail on a bad --slo before starting anything
    report = asyncio.run(run(args))
    if args.out:
        for path in write_outputs(report, args.out, args.name):
            console.print(f"wrote {path}")
    if args.json:
        emit_report(report, args.json, echo=False)
    print(markdown_summary(report), file=sys.stderr)
    return 0


def markdown_summary(report: dict) -> str:
    from .report import summary_table

    rows = [(p["label"], p["summary"]) for p in report["phases"]]
    return "\n".join(summary_table(rows, report["slo"]))


if __name__ == "__main__":
    sys.exit(main())
