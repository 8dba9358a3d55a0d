"""Prometheus metrics, recorded through Ray Serve's metrics API.

How they reach Prometheus: ``ray.serve.metrics`` objects hand their values to the Ray metrics agent
of the node the replica runs on, which serves them at ``http://<node>:<metrics-export-port>/metrics``
(``ray start --metrics-export-port=N``; ``ray.init(_metrics_export_port=N)`` in tests). Ray prefixes
every name with ``ray_`` and counters get ``_total``: ``chatserve_ttft_seconds`` is scraped as
``ray_chatserve_ttft_seconds_bucket``/``_sum``/``_count``. Serve adds the ``application``,
``deployment`` and ``replica`` labels itself, because every metric here is created inside a replica
(the objects are built lazily for that reason: built in the driver they would carry no Serve labels).

Two groups:
- :class:`ModelMetrics` (one per model replica): per-request latency and token counts observed in
  ``ModelServer.generate``, plus the engine's gauges and counters copied from ``engine.stats()``
  once a second by the replica's reporter (``serve_app/ops.py``).
- :class:`IngressMetrics` (one per ingress replica): errors by status and code, rejections
  (503/429), open WebSocket connections and active sessions.

``METRIC_NAMES`` lists every name defined here; the Grafana dashboard test checks against it.
"""

from __future__ import annotations

import functools
import time
from collections import Counter as Tally
from dataclasses import dataclass

from ray.serve.metrics import Counter, Gauge, Histogram

from engines.protocol import Delta, EngineStats

TTFT_BUCKETS_S = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
TPOT_BUCKETS_S = [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]

# name -> (kind, description); Ray exports each as ray_<name> (+ _total for counters).
METRIC_NAMES: dict[str, tuple[str, str]] = {
    # model replica, per request
    "chatserve_ttft_seconds": ("histogram", "Time from a request reaching the model replica to its first token"),
    "chatserve_time_per_output_token_seconds": ("histogram", "Mean time between output tokens of a finished request"),
    "chatserve_generated_tokens": ("counter", "Output tokens streamed back by the model replica"),
    "chatserve_requests_finished": ("counter", "Model requests ended, by finish_reason (stop, length, abort, error, cancelled)"),
    "chatserve_requests_cancelled": ("counter", "Model requests whose stream was closed before they finished"),
    # model replica, from engine.stats() once a second
    "chatserve_engine_batch_size": ("gauge", "Sequences in the engine's last step"),
    "chatserve_engine_steps": ("counter", "Engine steps (prefill chunks and decode steps)"),
    "chatserve_engine_running_seqs": ("gauge", "Sequences holding a KV row"),
    "chatserve_engine_waiting_seqs": ("gauge", "Sequences queued for admission"),
    "chatserve_engine_kv_allocated_tokens": ("gauge", "KV cache allocated for running sequences, in tokens"),
    "chatserve_engine_kv_budget_tokens": ("gauge", "KV cache budget for running sequences, in tokens"),
    "chatserve_engine_kv_occupancy_ratio": ("gauge", "kv_allocated_tokens / kv_budget_tokens"),
    "chatserve_prefix_cache_tokens": ("gauge", "Tokens of finished sequences' KV held for reuse"),
    "chatserve_prefix_cache_occupancy_ratio": ("gauge", "prefix_cache_tokens / prefix cache budget"),
    "chatserve_prefix_cache_hits": ("counter", "Admissions that reused a cached prefix"),
    "chatserve_prefix_cache_misses": ("counter", "Admissions that found no reusable prefix"),
    "chatserve_prefix_cache_reused_tokens": ("counter", "Prompt tokens whose KV came from the prefix cache"),
    "chatserve_engine_loop_alive": ("gauge", "1 while the engine's step loop runs"),
    # ingress
    "chatserve_errors": ("counter", "Errors returned to clients, by HTTP status and code"),
    "chatserve_rejections": ("counter", "Requests refused for load (status 503 or 429), by code"),
    "chatserve_active_sessions": ("gauge", "Sessions with an open WebSocket or a reply streaming, per ingress replica"),
    "chatserve_websocket_connections": ("gauge", "Open WebSocket connections, per ingress replica"),
}

ENGINE_GAUGES = [name for name, (kind, _) in METRIC_NAMES.items()
                 if kind == "gauge" and name.startswith(("chatserve_engine_", "chatserve_prefix_cache_"))]
ENGINE_COUNTERS = ["chatserve_engine_steps", "chatserve_prefix_cache_hits", "chatserve_prefix_cache_misses",
                   "chatserve_prefix_cache_reused_tokens"]
REJECTION_STATUSES = (429, 503)


def _metric(name: str, tag_keys: tuple[str, ...] | None = None, boundaries: list[float] | None = None):
    kind, description = METRIC_NAMES[name]
    if kind == "histogram":
        return Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)
    if kind == "counter":
        return Counter(name, description=description, tag_keys=tag_keys)
    return Gauge(name, description=description, tag_keys=tag_keys)


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

    def close(self) -> None:
        """Call once the stream is left, finished or not; an unfinished one counts as cancelled."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            self.metrics.cancelled.inc()
            self.metrics.finished.inc(tags={"finish_reason": "cancelled"})


class ModelMetrics:
    """A model replica's metrics. Build it inside the replica (``__init__``)."""

    def __init__(self) -> None:
        self.ttft = _metric("chatserve_ttft_seconds", boundaries=TTFT_BUCKETS_S)
        self.tpot = _metric("chatserve_time_per_output_token_seconds", boundaries=TPOT_BUCKETS_S)
        self.generated_tokens = _metric("chatserve_generated_tokens")
        self.finished = _metric("chatserve_requests_finished", tag_keys=("finish_reason",))
        self.cancelled = _metric("chatserve_requests_cancelled")
        self.gauges = {name: _metric(name) for name in ENGINE_GAUGES}
        self.counters = {name: _metric(name) for name in ENGINE_COUNTERS}
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


def kv_occupancy(stats: EngineStats) -> float:
    return stats.kv_allocated_tokens / stats.kv_budget_tokens if stats.kv_budget_tokens else 0.0


def prefix_cache_occupancy(stats: EngineStats) -> float:
    budget = stats.prefix_cache_budget_tokens
    return stats.prefix_cache_tokens / budget if budget else 0.0


class IngressMetrics:
    """The ingress replica's metrics. Use :func:`ingress_metrics` (built on first use, in the replica)."""

    def __init__(self) -> None:
        self.errors = _metric("chatserve_errors", tag_keys=("status", "code"))
        self.rejections = _metric("chatserve_rejections", tag_keys=("status", "code"))
        self.websockets = _metric("chatserve_websocket_connections")
        self.active_sessions = _metric("chatserve_active_sessions")
        self._sessions: Tally[str] = Tally()
        self._websockets = 0

    def error(self, status: int, code: str | None) -> None:
        tags = {"status": str(status), "code": code or "none"}
        self.errors.inc(tags=tags)
        if status in REJECTION_STATUSES:
            self.rejections.inc(tags=tags)

    def websocket_opened(self) -> None:
        self._websockets += 1
        self.websockets.set(self._websockets)

    def websocket_closed(self) -> None:
        self._websockets -= 1
        self.websockets.set(self._websockets)

    def session_entered(self, session_id: str | None) -> None:
        """A WebSocket bound to ``session_id`` or a reply started in it; pair with :meth:`session_left`."""
        if session_id is not None:
            self._sessions[session_id] += 1
            self.active_sessions.set(len(self._sessions))

    def session_left(self, session_id: str | None) -> None:
        if session_id is not None and self._sessions[session_id] > 0:
            self._sessions[session_id] -= 1
            if self._sessions[session_id] == 0:
                del self._sessions[session_id]
            self.active_sessions.set(len(self._sessions))


@functools.cache
def ingress_metrics() -> IngressMetrics:
    """The ingress replica's one :class:`IngressMetrics` (module-level exception handlers need it too)."""
    return IngressMetrics()
