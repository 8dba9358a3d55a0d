"""Prometheus metrics, recorded through Ray Serve's metrics API.

How they reach Prometheus: ``ray.serve.metrics`` objects hand their values to the Ray metrics agent
of the node the replica runs on, which serves them at ``http://<node>:<metrics-export-port>/metrics``
(``ray start --metrics-export-port=N``; ``ray.init(_metrics_export_port=N)`` in tests). Ray prefixes
every name with ``ray_`` and counters get ``_total``: ``chatserve_ttft_seconds`` is scraped as
``ray_chatserve_ttft_seconds_bucket``/``_sum``/``_count``. Serve adds the ``application``,
``deployment`` and ``replica`` labels itself, because every metric here is created inside a replica
(the objects are built lazily for that reason: built in the driver they would carry no Serve labels).

Two groups, each recorded in its deployment:
- ``serve_app/model/metrics.py`` (one per model replica): per-request latency and token counts
  observed in ``ModelServer.generate``, plus the engine's gauges and counters copied from
  ``engine.stats()`` once a second by the replica's reporter (``serve_app/model/reporter.py``).
- ``serve_app/ingress/metrics.py`` (one per ingress replica): errors by status and code, rejections
  (503/429), open WebSocket connections and active sessions.

``METRIC_NAMES`` lists every name; the Grafana dashboard test checks against it.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from engines.protocol import EngineStats

TTFT_BUCKETS_S = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
TPOT_BUCKETS_S = [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]

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


def metric(name: str, tag_keys: tuple[str, ...] | None = None, boundaries: list[float] | None = None):
    kind, description = METRIC_NAMES[name]
    if kind == "histogram":
        return Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)
    if kind == "counter":
        return Counter(name, description=description, tag_keys=tag_keys)
    return Gauge(name, description=description, tag_keys=tag_keys)


def kv_occupancy(stats: EngineStats) -> float:
    return stats.kv_allocated_tokens / stats.kv_budget_tokens if stats.kv_budget_tokens else 0.0


def prefix_cache_occupancy(stats: EngineStats) -> float:
    budget = stats.prefix_cache_budget_tokens
    return stats.prefix_cache_tokens / budget if budget else 0.0


