"""Runs in every model replica: once a second, the engine's stats go into the replica's Prometheus
metrics and, as a :class:`~serve_app.schemas.ReplicaReport`, to the ``OpsCollector`` deployment (a
handle call would reach only one model replica, so the replicas report instead of being asked)."""

from __future__ import annotations

import asyncio
import logging
import os

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..schemas import ReplicaReport
from .metrics import ModelMetrics

logger = logging.getLogger("ray.serve")

REPORT_PERIOD_S = 1.0


class ReplicaReporter:
    """Runs in a model replica: every ``period_s``, engine stats -> metrics -> ops collector."""

    def __init__(self, engine, metrics: ModelMetrics, collector: DeploymentHandle | None,
                 period_s: float = REPORT_PERIOD_S):
        self.engine = engine
        self.metrics = metrics
        self.collector = collector
        self.period_s = period_s
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.deployment = context.deployment
        self.node_id = ray.get_runtime_context().get_node_id()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the loop on the replica's event loop (the constructor runs on it)."""
        self._task = asyncio.get_running_loop().create_task(self.run())

    def report(self) -> ReplicaReport:
        stats = self.engine.stats()
        self.metrics.record_engine(stats)
        return ReplicaReport(replica=self.replica, deployment=self.deployment, node_id=self.node_id, pid=os.getpid(),
                             stats=stats, ttft_samples_s=tuple(self.metrics.drain_ttft_samples()))

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                report = self.report()
                if self.collector is not None:
                    await asyncio.wait_for(self.collector.report.remote(report), timeout=10 * self.period_s)
                failures = 0
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                failures += 1
                if failures in (1, 60) or failures % 600 == 0:
                    logger.warning("ops report failed %d times in a row", failures, exc_info=True)
            await asyncio.sleep(self.period_s)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
