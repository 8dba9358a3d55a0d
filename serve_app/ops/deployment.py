"""The ``OpsCollector`` deployment (one replica): keeps the :class:`~serve_app.ops.view.OpsView`
that ``/ops/state`` returns, from the reports every model replica pushes each second and from
``serve.status()``, polled every two seconds."""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from ..schemas import ReplicaReport
from .view import DeploymentState, OpsView

logger = logging.getLogger("ray.serve")

STATUS_PERIOD_S = 2.0


def deployment_states(app_name: str) -> list[DeploymentState]:
    """Read ``serve.status()`` (blocking: call it in a thread)."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return []
    return [DeploymentState(name=name, status=_enum_name(d.status), status_trigger=_enum_name(d.status_trigger),
                            message=d.message, replica_states={_enum_name(k): v for k, v in d.replica_states.items()})
            for name, d in app.deployments.items()]


def _enum_name(value) -> str:
    return str(getattr(value, "value", value))


@serve.deployment(name="OpsCollector")  # options: serve_config.yaml
class OpsCollector:
    """Receives every model replica's reports and polls Serve's status; answers ``snapshot``."""

    def __init__(self, status_period_s: float = STATUS_PERIOD_S):
        self.view = OpsView()
        self.app_name = serve.get_replica_context().app_name
        self.status_period_s = status_period_s
        self._poller = asyncio.get_running_loop().create_task(self._poll_status())

    async def _poll_status(self) -> None:
        while True:
            try:
                states = await asyncio.to_thread(deployment_states, self.app_name)
                self.view.add_status(states, time.time())
            except Exception:  # noqa: BLE001 - the controller may be busy; try again next period
                logger.warning("ops collector: serve.status() failed", exc_info=True)
            await asyncio.sleep(self.status_period_s)

    async def report(self, report: ReplicaReport) -> None:
        self.view.add_report(report, time.time())

    async def snapshot(self) -> dict:
        return self.view.snapshot(time.time())
