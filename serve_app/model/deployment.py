"""Model replica deployment: one engine per replica, fed by ``@serve.batch``.

How batching works here: requests that reach the replica within ``batch_wait_timeout_s`` of each
other are gathered by ``@serve.batch`` into one admission (``engine.submit``); from then on the
engine batches at every step (continuous batching), so a request that arrives later joins at the
next step rather than waiting for this group. ``generate`` is an async generator around the batched
admission (Ray 2.60's batch wrapper is not itself a generator) that streams the engine's deltas
back through the handle. Closing the stream (client gone) aborts the request in the engine.

Stream batching: every item a stream yields crosses two processes (model replica → ingress → HTTP
proxy) and costs CPU in each, per stream, per token; on a busy replica that is CPU the engine needs.
So while the replica serves ``stream_batching_min_streams`` streams or more, a stream's deltas are
held and sent together at most every ``stream_interval_s`` (as Ray Serve LLM does). The first token
and the last delta are never held, and a replica with few streams sends every token at once.

The constructor loads the engine artifact and runs a real short generation before the replica is
marked ready, so the first user request never pays for first-call setup.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, replace

from ray import serve
from ray.serve.handle import DeploymentHandle

from engines.protocol import BatchSubmit, Delta, GenerationRequest, SamplingParams
from engines.registry import create_engine

from ..config import ModelSettings
from .metrics import ModelMetrics
from .reporter import ReplicaReporter

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_STREAM_INTERVAL_S = 0.05
DEFAULT_STREAM_BATCHING_MIN_STREAMS = 8
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.005


async def coalesced(deltas: AsyncIterator[Delta], interval_s: float, busy: Callable[[], bool],
                    clock: Callable[[], float] = time.monotonic) -> AsyncIterator[Delta]:
    """``deltas``, with those that come within ``interval_s`` of the last one sent held and sent
    together while ``busy()``; the first and the final delta are never held."""
    held: Delta | None = None
    sent_s: float | None = None  # when the last one went (None: none yet)
    async for delta in deltas:
        delta = held.then(delta) if held is not None else delta
        held = None
        if delta.finish_reason is None and sent_s is not None and busy() and clock() - sent_s < interval_s:
            held = delta  # sent with the next one
            continue
        yield delta
        sent_s = clock()


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


@serve.deployment(name="ModelServer")  # options (autoscaling, router, batching): serve_config.yaml
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
        self.streams = 0  # generate() calls streaming now
        self.stream_interval_s = DEFAULT_STREAM_INTERVAL_S
        self.stream_batching_min_streams = DEFAULT_STREAM_BATCHING_MIN_STREAMS
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
        """``user_config`` in serve_config.yaml: max_batch_size, batch_wait_timeout_s, stream_interval_s,
        stream_batching_min_streams."""
        self._admit.set_max_batch_size(int(user_config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)))
        self._admit.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s",
                                                                   DEFAULT_BATCH_WAIT_TIMEOUT_S)))
        self.stream_interval_s = float(user_config.get("stream_interval_s", DEFAULT_STREAM_INTERVAL_S))
        self.stream_batching_min_streams = int(user_config.get("stream_batching_min_streams",
                                                               DEFAULT_STREAM_BATCHING_MIN_STREAMS))

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def _admit(self, requests: list[GenerationRequest]) -> list[AsyncIterator[Delta] | Exception]:
        """One admission for the batch; a request the engine refuses fails alone (the engine's
        ``submit`` answers per request)."""
        if isinstance(self.engine, BatchSubmit):
            return self.engine.submit(requests)
        return [self.engine.generate(r) for r in requests]

    async def generate(self, request: GenerationRequest, affinity_key: str | None = None) -> AsyncIterator[Delta]:
        """Stream one request's deltas. ``affinity_key`` is read by the request router
        (serve_app/routing.py) to pick this replica; the replica itself does not need it."""
        watch = self.metrics.watch(started_s=time.perf_counter())
        try:
            stream = await self._admit(request)
        except asyncio.CancelledError:
            self.engine.abort(request.request_id)  # admitted with its batch, but nobody will read it
            raise
        if isinstance(stream, Exception):
            raise stream
        self.streams += 1
        try:
            async for delta in coalesced(watch.follow(stream), self.stream_interval_s, self._busy):
                yield replace(delta, served_by=self.replica_id) if delta.finish_reason is not None else delta
        finally:
            self.streams -= 1
            watch.close()
            await stream.aclose()  # aborts the request if it has not finished

    def _busy(self) -> bool:
        return self.streams >= self.stream_batching_min_streams

    def check_health(self) -> None:
        self.engine.check_health()

    async def ready(self) -> dict:
        return {"ready_s": round(self.ready_s, 3), "warmup_s": round(self.warmup_s, 3)}

    async def stats(self) -> dict:
        return {"replica": self.replica_id, **asdict(self.engine.stats())}

    def __del__(self) -> None:
        """Serve calls this when the replica stops (scale-down, redeploy): stop reporting, free the
        engine. Also reached after a constructor that failed half-way, hence the getattr."""
        if getattr(self, "reporter", None) is not None:
            self.reporter.stop()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
