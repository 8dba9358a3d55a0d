"""The operator's view: what ``/ops`` shows and ``/ops/state`` returns, kept without Serve.

How it works: a handle call reaches only one model replica, so the replicas report instead of
being asked. Every model replica runs a reporter (``serve_app/model/reporter.py``) that, once a
second, pushes a :class:`~serve_app.schemas.ReplicaReport` (its engine's stats, the TTFT samples
since the last push, the node it runs on) to the one-replica ``OpsCollector`` deployment
(``serve_app/ops/deployment.py``), which also polls ``serve.status()`` every two seconds. From both
it keeps, in :class:`OpsView`:

- the latest report of every replica; a replica silent for ``stale_after_s`` is gone (its node
  died, it was scaled down) and leaves an event;
- rolling windows (``window_s``, in ``bucket_s`` buckets) of TTFT samples and of counter increases
  (tokens generated, prefix-cache hits and misses), from which p50/p95 and rates are computed;
- events: replica-count changes per deployment (autoscaling, failures), deployment status
  changes, replicas appearing and going.

The collector holds no state worth keeping: if it restarts, the view refills within the window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

from ..metrics import kv_occupancy, prefix_cache_occupancy
from ..schemas import ReplicaReport


@dataclass(frozen=True)
class DeploymentState:
    """What ``serve.status()`` says about one deployment."""

    name: str
    status: str
    status_trigger: str
    message: str
    replica_states: dict[str, int]

    @property
    def running_replicas(self) -> int:
        return self.replica_states.get("RUNNING", 0)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class RollingWindow:
    """Values with timestamps, kept for ``window_s`` and grouped into ``bucket_s`` buckets."""

    def __init__(self, window_s: float, bucket_s: float):
        self.window_s = window_s
        self.bucket_s = bucket_s
        self._items: deque[tuple[float, float]] = deque()

    def add(self, value: float, now_s: float) -> None:
        self._items.append((now_s, value))
        self._expire(now_s)

    def _expire(self, now_s: float) -> None:
        while self._items and self._items[0][0] < now_s - self.window_s:
            self._items.popleft()

    def values(self, now_s: float, last_s: float | None = None) -> list[float]:
        self._expire(now_s)
        since = now_s - (self.window_s if last_s is None else last_s)
        return [v for t, v in self._items if t >= since]

    def buckets(self, now_s: float) -> list[tuple[float, list[float]]]:
        """Every bucket of the window, oldest first, as (bucket start, values in it)."""
        self._expire(now_s)
        count = int(self.window_s // self.bucket_s)
        first = (math.floor(now_s / self.bucket_s) - count + 1) * self.bucket_s
        out: list[tuple[float, list[float]]] = [(first + i * self.bucket_s, []) for i in range(count)]
        for t, v in self._items:
            i = int((t - first) // self.bucket_s)
            if 0 <= i < count:
                out[i][1].append(v)
        return out


COUNTED_STATS = ("tokens_generated", "prefix_cache_hits", "prefix_cache_misses", "requests_finished")


class OpsView:
    """Everything the ops page shows, kept from replica reports and Serve status (no Serve needed)."""

    def __init__(self, window_s: float = 300.0, bucket_s: float = 10.0, stale_after_s: float = 5.0,
                 rate_window_s: float = 60.0, max_events: int = 100):
        self.window_s = window_s
        self.bucket_s = bucket_s
        self.stale_after_s = stale_after_s
        self.rate_window_s = rate_window_s
        self.started_s: float | None = None
        self.replicas: dict[str, tuple[float, ReplicaReport]] = {}
        self.ttft = RollingWindow(window_s, bucket_s)
        self.increases = {name: RollingWindow(window_s, bucket_s) for name in COUNTED_STATS}
        self.deployments: dict[str, DeploymentState] = {}
        self.events: deque[dict] = deque(maxlen=max_events)

    def _event(self, now_s: float, kind: str, **fields) -> None:
        self.events.append({"at_s": now_s, "kind": kind, **fields})

    def add_report(self, report: ReplicaReport, now_s: float) -> None:
        if self.started_s is None:
            self.started_s = now_s
        previous = self.replicas.get(report.replica)
        if previous is None:
            self._event(now_s, "replica_up", deployment=report.deployment, replica=report.replica,
                        node_id=report.node_id)
        else:
            for name in COUNTED_STATS:
                # A counter that went down means a new engine under the same id: count from zero.
                before = getattr(previous[1].stats, name)
                after = getattr(report.stats, name)
                increase = after - before if after >= before else after
                if increase:
                    self.increases[name].add(increase, now_s)
        for ttft_s in report.ttft_samples_s:
            self.ttft.add(ttft_s, now_s)
        self.replicas[report.replica] = (now_s, report)

    def expire_replicas(self, now_s: float) -> None:
        for replica, (seen_s, report) in list(self.replicas.items()):
            if now_s - seen_s > self.stale_after_s:
                del self.replicas[replica]
                self._event(now_s, "replica_gone", deployment=report.deployment, replica=replica,
                            node_id=report.node_id, silent_s=round(now_s - seen_s, 1))

    def add_status(self, states: list[DeploymentState], now_s: float) -> None:
        for state in states:
            before = self.deployments.get(state.name)
            if before is not None and before.running_replicas != state.running_replicas:
                self._event(now_s, "scaled", deployment=state.name, from_replicas=before.running_replicas,
                            to_replicas=state.running_replicas, trigger=state.status_trigger)
            if before is not None and before.status != state.status:
                self._event(now_s, "status", deployment=state.name, from_status=before.status,
                            to_status=state.status, trigger=state.status_trigger, message=state.message)
            self.deployments[state.name] = state

    def _rate_per_s(self, name: str, now_s: float) -> float:
        span_s = min(self.rate_window_s, now_s - self.started_s) if self.started_s is not None else 0.0
        return sum(self.increases[name].values(now_s, self.rate_window_s)) / span_s if span_s > 0 else 0.0

    def snapshot(self, now_s: float) -> dict:
        """The JSON body of ``/ops/state``."""
        self.expire_replicas(now_s)
        reports = [r for _, r in self.replicas.values()]
        ttft_s = self.ttft.values(now_s)
        hits = sum(self.increases["prefix_cache_hits"].values(now_s))
        misses = sum(self.increases["prefix_cache_misses"].values(now_s))
        return {
            "at_s": now_s,
            "window_s": self.window_s,
            "deployments": [{**asdict(d), "running_replicas": d.running_replicas}
                            for d in self.deployments.values()],
            "model_replicas": [replica_row(r, now_s - seen_s) for seen_s, r in
                               sorted(self.replicas.values(), key=lambda item: item[1].replica)],
            "totals": {
                "model_replicas": len(reports),
                "requests_running": sum(r.stats.running for r in reports),
                "requests_waiting": sum(r.stats.waiting for r in reports),
                "requests_in_flight": sum(r.stats.running + r.stats.waiting for r in reports),
                "tokens_per_s": round(self._rate_per_s("tokens_generated", now_s), 2),
                "requests_per_s": round(self._rate_per_s("requests_finished", now_s), 3),
                "ttft_p50_s": percentile(ttft_s, 50),
                "ttft_p95_s": percentile(ttft_s, 95),
                "ttft_samples": len(ttft_s),
                "prefix_cache_hit_rate": hits / (hits + misses) if hits + misses else None,
                "prefix_cache_lookups": hits + misses,
            },
            "series": {
                "bucket_s": self.bucket_s,
                "start_s": [start for start, _ in self.ttft.buckets(now_s)],
                "tokens_per_s": [round(sum(v) / self.bucket_s, 2) for _, v in
                                 self.increases["tokens_generated"].buckets(now_s)],
                "ttft_p50_s": [percentile(v, 50) for _, v in self.ttft.buckets(now_s)],
                "ttft_p95_s": [percentile(v, 95) for _, v in self.ttft.buckets(now_s)],
            },
            "events": list(self.events)[::-1],
        }


def replica_row(report: ReplicaReport, age_s: float) -> dict:
    s = report.stats
    lookups = s.prefix_cache_hits + s.prefix_cache_misses
    return {
        "replica": report.replica, "deployment": report.deployment, "node_id": report.node_id, "pid": report.pid,
        "report_age_s": round(age_s, 2), "running": s.running, "waiting": s.waiting,
        "last_batch_size": s.last_batch_size, "kv_occupancy": round(kv_occupancy(s), 4),
        "prefix_cache_occupancy": round(prefix_cache_occupancy(s), 4),
        "prefix_cache_hit_rate": s.prefix_cache_hits / lookups if lookups else None,
        "tokens_generated": s.tokens_generated, "requests_finished": s.requests_finished,
        "loop_alive": s.loop_alive,
    }
