"""Latency and throughput metrics, with the definitions vLLM's ``benchmark_serving`` and GuideLLM use.

Per request, from client-side timestamps (seconds since the run started):

- **TTFT**: request sent -> first non-empty content chunk.
- **TPOT**: (last content chunk - first content chunk) / (output_tokens - 1), the mean time per output
  token after the first; undefined for one-token replies.
- **ITL**: the gaps between consecutive content chunks (a chunk may carry more than one token when the
  server holds text back, e.g. an incomplete UTF-8 character).
- **E2E latency**: request sent -> end of the stream.

``output_tokens`` and ``prompt_tokens`` are the server's ``usage`` numbers, never a client-side guess.

Aggregated over a phase: percentiles (numpy's linear interpolation, as vLLM), request throughput and
output tokens/s over the phase's wall time, error counts by kind, and **goodput**: requests per second
that completed *and* met every SLO given (``--slo ttft_ms=500,tpot_ms=100``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)
SLO_KEYS = {"ttft_ms": "ttft_s", "tpot_ms": "tpot_s", "e2e_ms": "e2e_s"}


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds on the run's clock."""

    start_s: float
    end_s: float
    chunk_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None  # an error kind ("http_503", "timeout", ...), None when it succeeded
    error_detail: str | None = None  # the server's message or the exception, shortened
    phase: str = ""
    stage: str = ""
    conversation: int | None = None
    turn: int | None = None
    replica: str | None = None  # sessions API: the model replica that served the turn, when the server says
    history_turns_dropped: int | None = None  # sessions API: old turns left out of this turn's prompt
    response_id: str | None = None  # Responses API: the response this request created

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] - self.start_s if self.chunk_times_s else None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or not self.output_tokens or self.output_tokens < 2 or len(self.chunk_times_s) < 2:
            return None
        return (self.chunk_times_s[-1] - self.chunk_times_s[0]) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        return np.diff(self.chunk_times_s).tolist() if len(self.chunk_times_s) > 1 else []

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    def to_json(self) -> dict:
        out = asdict(self)
        out["chunk_times_s"] = [round(t, 4) for t in self.chunk_times_s]
        out.update(ttft_s=self.ttft_s, tpot_s=self.tpot_s, e2e_s=self.e2e_s)
        return out


@dataclass(frozen=True)
class Slo:
    """Service-level objectives; a bound left as None is not checked."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> Slo:
        """``ttft_ms=500,tpot_ms=100,e2e_ms=20000`` (milliseconds, as vLLM's ``--goodput``)."""
        if not text:
            return cls()
        bounds = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in SLO_KEYS or not value:
                raise ValueError(f"bad SLO {item!r}: use {', '.join(k + '=<ms>' for k in SLO_KEYS)}")
            bounds[SLO_KEYS[key]] = float(value) / 1000
        return cls(**bounds)

    @property
    def empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2e_s is None

    def met_by(self, r: RequestRecord) -> bool:
        """A request is good when it succeeded and met every bound (a one-token reply has no TPOT,
        so a TPOT bound cannot fail it)."""
        if not r.ok or r.ttft_s is None:
            return False
        checks = ((self.ttft_s, r.ttft_s), (self.tpot_s, r.tpot_s), (self.e2e_s, r.e2e_s))
        return all(bound is None or value is None or value <= bound for bound, value in checks)

    def to_json(self) -> dict:
        return {k: round(getattr(self, v) * 1000, 3) for k, v in SLO_KEYS.items() if getattr(self, v) is not None}


def distribution(values: list[float]) -> dict | None:
    """mean and p50/p90/p95/p99 of ``values`` (None when there are none)."""
    if not values:
        return None
    arr = np.asarray(values, dtype=float)
    out = {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}}
    out["max"] = float(arr.max())
    return out


def summarize(records: list[RequestRecord], duration_s: float, slo: Slo = Slo()) -> dict:
    """Aggregate metrics of the requests of one phase that lasted ``duration_s`` seconds."""
    done = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    examples: dict[str, str | None] = {}
    for r in records:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
            examples.setdefault(r.error, r.error_detail)
    output_tokens = sum(r.output_tokens or 0 for r in done)
    out = {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": errors,
        "error_examples": examples,
        "duration_s": duration_s,
        "request_throughput_rps": len(done) / duration_s if duration_s > 0 else None,
        "output_throughput_tok_s": output_tokens / duration_s if duration_s > 0 else None,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens or 0 for r in done),
        "ttft_s": distribution([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_s": distribution([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_s": distribution([gap for r in done for gap in r.itl_s]),
        "e2e_s": distribution([r.e2e_s for r in done]),
    }
    if not slo.empty:
        good = sum(slo.met_by(r) for r in records)
        out["goodput_rps"] = good / duration_s if duration_s > 0 else None
        out["slo_attainment"] = good / len(records) if records else None
    return out


def time_series(records: list[RequestRecord], end_s: float, bucket_s: float) -> dict:
    """Per ``bucket_s`` window from 0 to ``end_s``: requests in flight (at the window's middle), output
    tokens/s, completed requests/s, and TTFT (by first-token time) and TPOT (by end time) percentiles.

    Totals come from ``usage``; how one request's tokens spread over windows follows its content
    chunks (each chunk gets an equal share), which is exact when a chunk is one token."""
    n = max(1, int(np.ceil(end_s / bucket_s)))
    edges = np.arange(n + 1) * bucket_s
    mid = edges[:-1] + bucket_s / 2
    done = [r for r in records if r.ok]
    tokens = np.zeros(n)
    for r in done:
        if r.output_tokens and r.chunk_times_s:
            idx = np.clip((np.asarray(r.chunk_times_s) // bucket_s).astype(int), 0, n - 1)
            np.add.at(tokens, idx, r.output_tokens / len(r.chunk_times_s))

    def bucket_of(t: float) -> int:
        return min(n - 1, max(0, int(t // bucket_s)))

    ttft: list[list[float]] = [[] for _ in range(n)]
    tpot: list[list[float]] = [[] for _ in range(n)]
    completed = np.zeros(n)
    failed = np.zeros(n)
    for r in records:
        if not r.ok:
            failed[bucket_of(r.end_s)] += 1
            continue
        completed[bucket_of(r.end_s)] += 1
        if r.ttft_s is not None:
            ttft[bucket_of(r.chunk_times_s[0])].append(r.ttft_s)
        if r.tpot_s is not None:
            tpot[bucket_of(r.end_s)].append(r.tpot_s)

    def pct(groups: list[list[float]], q: int) -> list[float | None]:
        return [float(np.percentile(g, q)) if g else None for g in groups]

    starts = np.asarray([r.start_s for r in records])
    ends = np.asarray([r.end_s for r in records])
    in_flight = [int(((starts <= t) & (ends > t)).sum()) for t in mid] if records else [0] * n
    return {
        "bucket_s": bucket_s,
        "t_s": mid.tolist(),
        "in_flight": in_flight,
        "output_tok_s": (tokens / bucket_s).tolist(),
        "completed_rps": (completed / bucket_s).tolist(),
        "failed_rps": (failed / bucket_s).tolist(),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p95_s": pct(tpot, 95),
    }


def _p50(values: list[float]) -> float | None:
    return float(np.percentile(values, 50)) if values else None


def multiturn_summary(records: list[RequestRecord], turns: int, modes: list[str]) -> dict:
    """TTFT p50 per turn index for each mode (phase label, e.g. ``reuse_on``), the history the model
    saw per turn (p50 of ``prompt_tokens``), and the prefix-cache hit rate from ``cached_tokens``:
    the share of prompt tokens served from cache (overall and per turn) and the share of turns with
    any hit. Hit rates are None when the server reports no ``cached_tokens``."""
    ok = [r for r in records if r.ok and r.turn is not None]

    def at(mode: str, turn: int) -> list[RequestRecord]:
        return [r for r in ok if r.phase == mode and r.turn == turn]

    history: list[float | None] = []
    for turn in range(turns):
        sizes = [r.prompt_tokens for mode in modes for r in at(mode, turn) if r.prompt_tokens is not None]
        history.append(_p50(sizes))
    hit_rate = {}
    for mode in modes:
        def has_cache_info(r: RequestRecord) -> bool:
            return r.cached_tokens is not None and bool(r.prompt_tokens)

        reported = [r for r in ok if r.phase == mode and has_cache_info(r)]
        per_turn = [[r.cached_tokens / r.prompt_tokens for r in at(mode, t) if has_cache_info(r)]
                    for t in range(turns)]
        hit_rate[mode] = {
            "cached_token_share": (sum(r.cached_tokens for r in reported) / sum(r.prompt_tokens for r in reported)
                                   if reported else None),
            "turns_with_hit_share": (sum(r.cached_tokens > 0 for r in reported) / len(reported) if reported else None),
            "cached_share_by_turn": [float(np.mean(v)) if v else None for v in per_turn],
            "turns_reported": len(reported),
        }
    dropped = [[r.history_turns_dropped for mode in modes for r in at(mode, t) if r.history_turns_dropped is not None]
               for t in range(turns)]
    replicas_per_conversation = {}
    for mode in modes:
        served: dict[int, set] = {}
        for r in ok:
            if r.phase == mode and r.replica is not None:
                served.setdefault(r.conversation, set()).add(r.replica)
        replicas_per_conversation[mode] = float(np.mean([len(v) for v in served.values()])) if served else None
    return {
        "turns": turns,
        "ttft_by_turn_s": {mode: [_p50([r.ttft_s for r in at(mode, t) if r.ttft_s is not None])
                                  for t in range(turns)] for mode in modes},
        "history_tokens_by_turn": history,
        "history_turns_dropped_by_turn": [max(d) if d else None for d in dropped],
        "hit_rate": hit_rate,
        # Mean distinct model replicas that served one conversation (1.0: every turn on one replica).
        "replicas_per_conversation": replicas_per_conversation,
    }
