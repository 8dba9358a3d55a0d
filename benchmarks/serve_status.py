"""Serve's own view of the app during a run: replicas per deployment and request queues, sampled.

Two sources, both Ray's, both plain HTTP so the load generator stays a light process:

- The dashboard's Serve REST API (``GET /api/serve/applications/``, what ``serve status`` reads):
  each deployment's replicas by state (RUNNING, STARTING, STOPPING...) and its ``target_num_replicas``.
- The Prometheus endpoint of every node's metrics agent (found through the dashboard's
  ``/nodes?view=summary``), summed over the handles that call each deployment:
  ``ray_serve_deployment_queued_queries`` (requests waiting in a router for a replica slot),
  ``ray_serve_num_ongoing_requests_at_replicas`` (assigned to a replica, running or in its queue),
  ``ray_serve_autoscaling_total_requests`` (the autoscaler's input) and
  ``ray_serve_autoscaling_target_replicas``. Ray exports these every ``metrics_report_interval_ms``
  (``--launch`` sets 1 s), so they trail the REST numbers a little.

When the target is not a Ray Serve app (no dashboard given or reachable) the run goes on without
samples and the report says why.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .client import Clock

GAUGES = {
    "ray_serve_deployment_queued_queries": "queued",
    "ray_serve_num_ongoing_requests_at_replicas": "ongoing",
    "ray_serve_autoscaling_total_requests": "autoscaler_requests",
    "ray_serve_autoscaling_target_replicas": "autoscaler_target_replicas",
}


@dataclass
class ServeSample:
    """One look at the app. Keys of each mapping are deployment names."""

    t_s: float
    replicas: dict[str, dict[str, int]] = field(default_factory=dict)  # state -> count
    target_replicas: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # GAUGES value -> deployment -> value

    def running(self, deployment: str) -> int:
        return self.replicas.get(deployment, {}).get("RUNNING", 0)


def ray_auth_headers() -> dict[str, str]:
    """The bearer token Ray's own clients send when token auth is on (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``); with auth off the header is ignored."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def parse_replicas(apps: dict, app_name: str) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Replica counts by state and target counts per deployment, from ``/api/serve/applications/``."""
    app = (apps.get("applications") or {}).get(app_name)
    if app is None:
        raise LookupError(f"no Serve application named {app_name!r}")
    replicas, targets = {}, {}
    for name, deployment in (app.get("deployments") or {}).items():
        states: dict[str, int] = {}
        for replica in deployment.get("replicas") or ():
            states[replica["state"]] = states.get(replica["state"], 0) + 1
        replicas[name] = states
        if deployment.get("target_num_replicas") is not None:
            targets[name] = int(deployment["target_num_replicas"])
    return replicas, targets


def parse_serve_gauges(text: str, app_name: str) -> dict[str, dict[str, float]]:
    """Sum the GAUGES of ``app_name`` by deployment from a Prometheus text exposition."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = GAUGES.get(sample.name)
            if key is None or sample.labels.get("application") != app_name:
                continue
            deployment = sample.labels.get("deployment", "?")
            per = out.setdefault(key, {})
            per[deployment] = per.get(deployment, 0.0) + sample.value
    return out


class DashboardStatus:
    """Replicas from the dashboard's Serve REST API, queues from the nodes' Prometheus endpoints."""

    def __init__(self, dashboard_url: str):
        self.url = dashboard_url.rstrip("/")
        self.metrics_urls: list[str] = []
        self.note: str | None = None
        self._http = httpx.AsyncClient(headers=ray_auth_headers(), timeout=5.0)

    async def _get_json(self, path: str) -> dict:
        response = await self._http.get(self.url + path)
        response.raise_for_status()
        return response.json()

    async def open(self) -> None:
        try:
            nodes = (await self._get_json("/nodes?view=summary"))["data"]["summary"]
            self.metrics_urls = [f"http://{n['ip']}:{n['raylet']['metricsExportPort']}/metrics" for n in nodes
                                 if n.get("raylet", {}).get("metricsExportPort")]
        except Exception as exc:  # noqa: BLE001 - replicas still work without queue metrics
            self.note = f"queue metrics unavailable (no node metrics endpoint found): {exc!r}"[:300]

    async def replicas(self, app_name: str) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        return parse_replicas(await self._get_json("/api/serve/applications/"), app_name)

    async def metrics(self, app_name: str) -> dict[str, dict[str, float]]:
        texts = await asyncio.gather(*[self._http.get(url) for url in self.metrics_urls], return_exceptions=True)
        out: dict[str, dict[str, float]] = {}
        for response in texts:
            if isinstance(response, BaseException) or response.status_code != 200:
                continue
            for key, per in parse_serve_gauges(response.text, app_name).items():
                into = out.setdefault(key, {})
                for deployment, value in per.items():
                    into[deployment] = into.get(deployment, 0.0) + value
        return out

    async def close(self) -> None:
        await self._http.aclose()

    def describe(self) -> dict:
        return {"source": self.url, "metrics_urls": self.metrics_urls}


class InProcessStatus:
    """``serve.status()`` from a process already connected to the cluster (``ray.init``): the same
    replica counts as the REST API, without target counts or queue metrics. For embedding the
    benchmark in a Ray driver (the test suite does)."""

    note: str | None = None

    async def open(self) -> None:
        pass

    async def replicas(self, app_name: str) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(app_name)
        if app is None:
            raise LookupError(f"no Serve application named {app_name!r}")
        return {name: {str(getattr(state, "value", state)): count for state, count in d.replica_states.items()}
                for name, d in app.deployments.items()}, {}

    async def metrics(self, app_name: str) -> dict[str, dict[str, float]]:
        return {}

    async def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"source": "serve.status() in process"}


class ServeSampler:
    """Samples a Serve app through ``source`` every ``interval_s`` seconds until ``stop()``."""

    def __init__(self, source: DashboardStatus | InProcessStatus, app_name: str, clock: Clock,
                 interval_s: float = 1.0):
        self.source = source
        self.app_name = app_name
        self.clock = clock
        self.interval_s = interval_s
        self.samples: list[ServeSample] = []
        self.note: str | None = None
        self._stopped = asyncio.Event()

    async def probe(self) -> bool:
        """Check that the source knows our app (False, with a note, when it does not)."""
        try:
            await self.source.open()
            await self.source.replicas(self.app_name)
        except Exception as exc:  # noqa: BLE001 - any failure means: no samples
            self.note = f"Serve status unavailable: {exc!r}"[:300]
            return False
        self.note = self.source.note
        return True

    async def run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.samples.append(await self._sample())
            except Exception as exc:  # noqa: BLE001 - a missed sample is not fatal
                self.note = f"some samples failed: {exc!r}"[:300]
            try:
                await asyncio.wait_for(self._stopped.wait(), self.interval_s)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stopped.set()

    async def _sample(self) -> ServeSample:
        t_s = self.clock.now()
        (replicas, targets), metrics = await asyncio.gather(self.source.replicas(self.app_name),
                                                            self.source.metrics(self.app_name))
        return ServeSample(t_s=t_s, replicas=replicas, target_replicas=targets, metrics=metrics)

    def to_json(self) -> dict:
        return {**self.source.describe(), "app": self.app_name, "interval_s": self.interval_s, "note": self.note,
                "samples": [asdict(s) for s in self.samples]}
