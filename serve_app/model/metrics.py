"""A model replica's Prometheus metrics (names and how they are exported: ``serve_app/metrics.py``):
per-request TTFT, time per output token and tokens observed in ``ModelServer.generate``, and the
engine's gauges and counters, copied from ``engine.stats()`` by the replica's reporter."""

from __future__ import annotations

import time
from dataclasses import dataclass

from engines.protocol import Delta, EngineStats

from ..metrics import (
    ENGINE_COUNTERS,
    ENGINE_GAUGES,
    TPOT_BUCKETS_S,
    TTFT_BUCKETS_S,
    kv_occupancy,
    metric,
    prefix_cache_occupancy,
)


@dataclass
class RequestWatch:
    """Follows one request's deltas: first token time, token count, how it ended."""

    metrics: ModelMetrics
    started_s: float
    first_token_s: float | None = None
    finish_reason: str | None = None

    def delta(self, delta: Delta) -> None:
        now = time.perf_counter()
        if delta.token_ids:
            if self.first_token_s is None:
                self.first_token_s = now
                self.metrics.observe_ttft(now - self.started_s)
            self.metrics.generated_tokens.inc(len(delta.token_ids))
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            tokens = delta.usage.completion_tokens if delta.usage else 0
            if self.first_token_s is not None and tokens > 1:
                self.metrics.tpot.observe((now - self.first_token_s) / (tokens - 1))
            self.metrics.finished.inc(tags={"finish_reason": delta.finish_reason})

    async def follow(self, deltas):
        """``deltas``, each one watched on its way."""
        async for delta in deltas:
            self.delta(delta)
            yield delta

    def close(self) -> None:
        """Call once the stream is left, finished or not; an unfinished one counts as cancelled."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            self.metrics.cancelled.inc()
            self.metrics.finished.inc(tags={"finish_reason": "cancelled"})


class ModelMetrics:
    """A model replica's metrics. Build it inside the replica (``__init__``)."""

    def __init__(self) -> None:
        self.ttft = metric("chatserve_ttft_seconds", boundaries=TTFT_BUCKETS_S)
        self.tpot = metric("chatserve_time_per_output_token_seconds", boundaries=TPOT_BUCKETS_S)
        self.generated_tokens = metric("chatserve_generated_tokens")
        self.finished = metric("chatserve_requests_finished", tag_keys=("finish_reason",))
        self.cancelled = metric("chatserve_requests_cancelled")
        self.gauges = {name: metric(name) for name in ENGINE_GAUGES}
        self.counters = {name: metric(name) for name in ENGINE_COUNTERS}
        self.recent_ttft_s: list[float] = []
        self._last_counts: dict[str, int] = {}

    def watch(self, started_s: float) -> RequestWatch:
        """``started_s``: ``time.perf_counter()`` when the request reached the replica."""
        return RequestWatch(self, started_s)

    def observe_ttft(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.recent_ttft_s.append(ttft_s)

    def drain_ttft_samples(self) -> list[float]:
        """TTFT samples since the last call (the ops collector keeps the rolling window)."""
        samples, self.recent_ttft_s = self.recent_ttft_s, []
        return samples

    def record_engine(self, stats: EngineStats) -> None:
        """Copy an engine snapshot into the gauges; turn its since-start counters into increments."""
        values = {
            "chatserve_engine_batch_size": stats.last_batch_size,
            "chatserve_engine_running_seqs": stats.running,
            "chatserve_engine_waiting_seqs": stats.waiting,
            "chatserve_engine_kv_allocated_tokens": stats.kv_allocated_tokens,
            "chatserve_engine_kv_budget_tokens": stats.kv_budget_tokens,
            "chatserve_engine_kv_occupancy_ratio": kv_occupancy(stats),
            "chatserve_prefix_cache_tokens": stats.prefix_cache_tokens,
            "chatserve_prefix_cache_occupancy_ratio": prefix_cache_occupancy(stats),
            "chatserve_engine_loop_alive": float(stats.loop_alive),
        }
        for name, value in values.items():
            self.gauges[name].set(value)
        counts = {
            "chatserve_engine_steps": stats.steps,
            "chatserve_prefix_cache_hits": stats.prefix_cache_hits,
            "chatserve_prefix_cache_misses": stats.prefix_cache_misses,
            "chatserve_prefix_cache_reused_tokens": stats.prefix_cache_reused_tokens,
        }
        for name, count in counts.items():
            increase = count - self._last_counts.get(name, 0)
            if increase > 0:
                self.counters[name].inc(increase)
            self._last_counts[name] = count


