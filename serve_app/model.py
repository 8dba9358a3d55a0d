"""Model replica deployment: one engine per replica, fed by ``@serve.batch``.

How batching works here: requests that reach the replica within ``batch_wait_timeout_s`` of each
other are gathered by ``@serve.batch`` into one admission (``engine.submit``); from then on the
engine batches at every step (continuous batching), so a request that arrives later joins at the
next step rather than waiting for this group. ``generate`` is an async generator around the batched
admission (Ray 2.60's batch wrapper is not itself a generator) that streams the engine's deltas
back through the handle. Closing the stream (client gone) aborts the request in the engine.

The constructor loads the engine artifact and runs a real short generation before the replica is
marked ready, so the first user request never pays for first-call setup.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, replace

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from engines.protocol import BatchSubmit, Delta, EngineError, GenerationRequest, SamplingParams
from engines.registry import create_engine

from .config import ModelSettings
from .metrics import ModelMetrics
from .ops import ReplicaReporter

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.005


def run_coroutine_in_thread(coro):
    """Run ``coro`` to completion on a private event loop (for a sync constructor)."""
    result: dict = {}

    def target():
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


@serve.deployment(
    name="ModelServer",
    ray_actor_options={"num_cpus": 0.8},
    max_ongoing_requests=64,
    max_queued_requests=64,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=10,
    request_router_config=RequestRouterConfig(request_router_class="serve_app.routing:SessionAffinityRouter"),
    autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 24,
                        "upscale_delay_s": 5, "downscale_delay_s": 30},
)
class ModelServer:
    def __init__(self, settings: ModelSettings, ops: DeploymentHandle | None = None):
        self.settings = settings
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        started = time.perf_counter()
        self.engine = create_engine(settings.engine_config())
        self.engine.start()
        self.warmup_s = run_coroutine_in_thread(self._warm_up())
        self.ready_s = time.perf_counter() - started
        logger.info("model replica ready in %.2fs (warm-up %.2fs)", self.ready_s, self.warmup_s)
        self.metrics = ModelMetrics()
        self.reporter = ReplicaReporter(self.engine, self.metrics, ops)  # engine stats -> metrics and /ops, each second
        self.reporter.start()

    async def _warm_up(self) -> float:
        started = time.perf_counter()
        request = GenerationRequest(messages=({"role": "user", "content": "Hello"},),
                                    sampling=SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        deltas = [d async for d in self.engine.generate(request)]
        if deltas[-1].usage.completion_tokens != 4:
            raise RuntimeError(f"warm-up generation produced {deltas[-1].usage} instead of 4 tokens")
        return time.perf_counter() - started

    def reconfigure(self, user_config: dict) -> None:
        """``user_config`` in serve_config.yaml: max_batch_size, batch_wait_timeout_s."""
        self._admit.set_max_batch_size(int(user_config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)))
        self._admit.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s",
                                                                   DEFAULT_BATCH_WAIT_TIMEOUT_S)))

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def _admit(self, requests: list[GenerationRequest]) -> list[AsyncIterator[Delta] | EngineError]:
        if isinstance(self.engine, BatchSubmit):
            return self.engine.submit(requests)
        return [self.engine.generate(r) for r in requests]

    async def generate(self, request: GenerationRequest, affinity_key: str | None = None) -> AsyncIterator[Delta]:
        """Stream one request's deltas. ``affinity_key`` is read by the request router
        (serve_app/routing.py) to pick this replica; the replica itself does not need it."""
        watch = self.metrics.watch(started_s=time.perf_counter())
        stream = await self._admit(request)
        if isinstance(stream, EngineError):
            raise stream
        try:
            async for delta in stream:
                watch.delta(delta)
                yield replace(delta, served_by=self.replica_id) if delta.finish_reason is not None else delta
        finally:
            watch.close()
            await stream.aclose()  # aborts the request if it has not finished

    def check_health(self) -> None:
        self.engine.check_health()

    async def ready(self) -> dict:
        return {"ready_s": round(self.ready_s, 3), "warmup_s": round(self.warmup_s, 3)}

    async def stats(self) -> dict:
        return {"replica": self.replica_id, **asdict(self.engine.stats())}

    async def model_info(self) -> dict:
        manifest = getattr(getattr(self.engine, "target", None), "manifest", None)
        return {"id": self.settings.served_model_name, "engine": self.settings.engine, "manifest": manifest}
