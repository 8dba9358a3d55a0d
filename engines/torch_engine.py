"""TorchEngine: our model runner behind an iteration-level (continuous) batching loop.

How this works. One thread runs the step loop, as nano-vllm does::

    batch = self.scheduler.schedule()          # admit, pick every decode token and prompt chunks
    tokens = self.runner.run(batch)            # one forward over all of them, sample
    self.scheduler.postprocess(batch, tokens)  # detokenize, stream out, retire

Sequences join and leave at every step, so a new request waits at most one step, never for a batch
to drain; its prompt is read in chunks inside the same forward as the running decodes. The scheduler
(``engines/scheduler.py``) owns admission, budgets and retirement; the model runner
(``engines/model_runner.py``) owns weights, KV cache, attention and sampling.

On CUDA (``decode_mode: auto`` or ``static``) the runner preallocates the KV cache from free GPU
memory and captures decode steps as CUDA graphs at start (``engines/static_decode.py``); the
scheduler's row limit and KV budget are then the cache's. An artifact prepared for a GPU by
``python -m engines.build --device cuda`` is checked against the GPU present (``engines/gpu.py``)
and its validated decode buckets are used.

Outputs cross to the asyncio side in one ``loop.call_soon_threadsafe`` per step (the step's deltas
for all requests together, one wake-up of the event loop instead of one per token), into one queue
per request; ``generate`` is an async iterator over that queue and aborts the request if the caller
stops early. When a consumer falls behind (many streams, a busy event loop), the deltas waiting in
its queue are merged into one, so each hop downstream (Serve handle, HTTP) carries several tokens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator
from functools import partial

import torch

from .artifacts import eos_token_ids, load_tokenizer, resolve_model
from .chat_template import encode_chat, output_budget, request_prompt_ids
from .config import DEFAULT_CUDA_GRAPH_BATCH_SIZES, EngineConfig
from .detokenizer import IncrementalDetokenizer
from .device import resolve_device, resolve_dtype
from .model_runner import ModelRunner
from .prefix_cache import PrefixCache
from .protocol import (
    Delta,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    EngineStats,
    GenerationRequest,
)
from .scheduler import Scheduler, Sequence

logger = logging.getLogger(__name__)

STUCK_AFTER_S = 120.0


class TorchEngine:
    """See the module docstring. Construct with an :class:`EngineConfig`, then :meth:`start`."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner: ModelRunner | None = None
        self.tokenizer = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._aborts: set[str] = set()
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Delta]]] = {}
        self._outbox_lock = threading.Lock()
        self._last_step_s = time.monotonic()
        self._steps = 0
        self._loop_error: BaseException | None = None
        self.load_seconds = 0.0
        self.static_decode = False
        self.capture_seconds = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        threads = self.config.num_threads or int(os.environ.get("ENGINE_NUM_THREADS", "0")) or os.cpu_count() or 1
        torch.set_num_threads(threads)
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        started = time.perf_counter()
        self.target = resolve_model(self.config.model)
        self.tokenizer = load_tokenizer(self.config.model)
        # max_seq_len None: the model's context (the runner knows it), within the KV budget.
        self.runner = ModelRunner(self.target, self.dtype, self.device, self.config.max_running_seqs,
                                  self.config.resolve_max_seq_len(None))
        self.load_seconds = time.perf_counter() - started
        self.max_seq_len = self.runner.max_seq_len
        self._check_gpu_artifact()
        max_running, kv_budget = self.config.max_running_seqs, self.config.kv_budget_tokens
        self.static_decode = self.config.decode_mode == "static" or (
            self.config.decode_mode == "auto" and self.device.type == "cuda")
        if self.static_decode:
            plan = self.runner.setup_static(max_running, kv_budget, self.config.gpu_memory_fraction,
                                            self._graph_batch_sizes(), capture=self.device.type == "cuda")
            max_running, kv_budget = plan.rows, plan.rows * plan.capacity
            self.capture_seconds = (self.runner.graph_report or {}).get("capture_s", 0.0)
        self.eos_ids = eos_token_ids(self.target.path, self.tokenizer, self.runner.hf_config)
        vocab = self.runner.spec.vocab_size  # a tokenizer may name ids the model has no logits for
        self.runner.banned_if_ignore_eos = torch.tensor(
            sorted(i for i in self.eos_ids | set(self.tokenizer.all_special_ids) if 0 <= i < vocab),
            dtype=torch.long, device=self.device)
        self.prefix_cache = PrefixCache(self.config.prefix_cache_tokens)
        self.scheduler = Scheduler(self.runner.kv, self.prefix_cache, self.eos_ids,
                                   max_running_seqs=max_running, kv_budget_tokens=kv_budget,
                                   max_batched_tokens=self.config.max_batched_tokens,
                                   max_queue_wait_s=self.config.max_queue_wait_s)
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()
        logger.info("engine started: model=%s (%s) dtype=%s load=%.2fs threads=%d device=%s", self.config.model,
                    self.runner.spec.architecture, self.dtype, self.load_seconds, threads, self.device)

    def _check_gpu_artifact(self) -> None:
        """On CUDA, an artifact prepared for a GPU (``engines.build --device cuda``) must be for this one."""
        gpu_section = (self.target.manifest or {}).get("gpu")
        if self.device.type != "cuda" or not gpu_section:
            return
        from .gpu import check_gpu_artifact, gpu_fingerprint

        check_gpu_artifact(gpu_section, gpu_fingerprint(self.device), self.target.path,
                           (self.target.manifest or {}).get("source"))
        if gpu_section.get("dtype") not in (None, self.dtype):
            logger.warning("artifact's GPU preparation was for %s, this replica runs %s: its buckets still apply",
                           gpu_section.get("dtype"), self.dtype)

    def _graph_batch_sizes(self) -> tuple[int, ...]:
        """The configured decode buckets, or the artifact's GPU preparation's when the configuration keeps
        the default (either way capped to this replica's rows by the runner)."""
        sizes = self.config.cuda_graph_batch_sizes
        recorded = ((self.target.manifest or {}).get("gpu") or {}).get("cuda_graph_batch_sizes")
        if self.device.type == "cuda" and recorded and sizes == DEFAULT_CUDA_GRAPH_BATCH_SIZES:
            return tuple(recorded)
        return sizes

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.runner is not None:
            self.scheduler.fail_all("abort")
            self._flush_outbox()
            if self._thread is None or not self._thread.is_alive():  # never free the cache under a running step
                self.runner.release()

    @property
    def kv(self):
        return self.runner.kv

    # -- the asyncio side -----------------------------------------------------------------------
    def prompt_ids_for(self, request: GenerationRequest) -> list[int]:
        return request_prompt_ids(request, self.tokenizer, self.runner.spec.vocab_size)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The prompt ids of chat messages; their text never becomes control tokens (``chat_template.py``)."""
        return encode_chat(self.tokenizer, messages)

    def _make_sequence(self, request: GenerationRequest, emit) -> Sequence:
        if self._loop_error is not None or self._thread is None or not self._thread.is_alive():
            raise EngineDeadError(f"engine loop is not running: {self._loop_error!r}")
        prompt_ids = self.prompt_ids_for(request)
        max_tokens = output_budget(len(prompt_ids), request.sampling.max_tokens, self.max_seq_len,
                                   self.config.default_max_tokens)
        generator = None
        if not request.sampling.greedy and request.sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed)
        return Sequence(request, prompt_ids, max_tokens, IncrementalDetokenizer(self.tokenizer, request.sampling.stop),
                        emit, generator)

    def submit(self, requests: list[GenerationRequest]) -> list[AsyncIterator[Delta] | EngineError]:
        """Queue several requests as one admission (one wake-up of the loop). Returns, per request,
        its delta stream or the error that rejected it. Each stream must be iterated or closed."""
        loop = asyncio.get_running_loop()
        results: list[AsyncIterator[Delta] | EngineError] = []
        for request in requests:
            out: asyncio.Queue[Delta] = asyncio.Queue()
            try:
                seq = self._make_sequence(request, partial(self._post, loop, out))
                if len(self.scheduler.waiting) + self._inbox.qsize() >= self.config.max_waiting_seqs:
                    raise EngineOverloadedError(f"waiting queue is full ({self.config.max_waiting_seqs} requests)")
            except Exception as exc:  # noqa: BLE001 - one request's failure is its own, never its batch's
                results.append(exc if isinstance(exc, EngineError) else EngineError(f"request refused: {exc!r}"))
                continue
            self._inbox.put(seq)
            results.append(self._stream(request.request_id, out))
        self._wakeup.set()
        return results

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        (result,) = self.submit([request])
        if isinstance(result, EngineError):
            raise result
        async for delta in result:
            yield delta

    async def _stream(self, request_id: str, out: asyncio.Queue) -> AsyncIterator[Delta]:
        finished = False
        try:
            while True:
                delta = await out.get()
                while not out.empty() and delta.finish_reason is None and delta.error is None:
                    delta = delta.then(out.get_nowait())  # the consumer fell behind: one hop for all
                if delta.error is not None:
                    finished = True
                    raise {"overloaded": EngineOverloadedError, "failed": EngineError}.get(
                        delta.error_kind, EngineDeadError)(delta.error)
                yield delta
                if delta.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def _post(self, loop: asyncio.AbstractEventLoop, out: asyncio.Queue, delta: Delta) -> None:
        with self._outbox_lock:
            self._outbox.setdefault(loop, []).append((out, delta))

    def _flush_outbox(self) -> None:
        """Hand the deltas posted since the last flush to their event loops, one call per loop."""
        with self._outbox_lock:
            outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def check_health(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError(f"engine loop is not running: {self._loop_error!r}")
        stalled_s = time.monotonic() - self._last_step_s
        if self.scheduler.busy and stalled_s > STUCK_AFTER_S:
            raise EngineDeadError(f"engine loop made no step for {stalled_s:.0f}s while busy")

    def stats(self) -> EngineStats:
        c = self.scheduler.counters
        kv = self.runner.kv
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting) + self._inbox.qsize(),
            max_running=self.scheduler.max_running_seqs, kv_budget_tokens=self.scheduler.kv_budget_tokens,
            kv_allocated_tokens=kv.allocated_tokens, kv_bytes=kv.allocated_bytes,
            steps=self._steps, tokens_generated=c["tokens_generated"], requests_finished=c["requests_finished"],
            requests_aborted=c["requests_aborted"], last_batch_size=c["last_batch_size"],
            loop_alive=self._thread is not None and self._thread.is_alive(),
            seconds_since_last_step=time.monotonic() - self._last_step_s,
            prefix_cache_hits=self.prefix_cache.hits, prefix_cache_misses=self.prefix_cache.misses,
            prefix_cache_reused_tokens=self.prefix_cache.reused_tokens,
            prefix_cache_tokens=self.prefix_cache.used_tokens, prefix_cache_budget_tokens=self.prefix_cache.budget_tokens,
        )

    # -- the step loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._drain_inbox()
                    self._flush_outbox()
                    if not self.scheduler.busy:
                        self._last_step_s = time.monotonic()
                        if self.runner.kv.rows:
                            self.runner.kv.release()
                        self._wakeup.wait(timeout=0.5)
                        self._wakeup.clear()
                        continue
                    self.step()
                    self._flush_outbox()
        except BaseException as exc:  # noqa: BLE001 - the loop must report whatever killed it
            logger.exception("engine loop died")
            self._loop_error = exc
            self.scheduler.fail_all("error", error=f"engine loop died: {exc!r}")
            self._flush_outbox()

    def step(self) -> None:
        """One iteration: schedule, run the model, hand out the tokens."""
        batch = self.scheduler.schedule()
        if batch:
            try:
                tokens = self.runner.run(batch)
            except Exception as exc:  # a failed forward fails the sequences in it, not the engine
                if is_cuda_context_error(exc):
                    raise  # the CUDA context is broken for good: let the loop die, check_health fail
                logger.exception("forward failed; failing %d running sequences", len(self.scheduler.running))
                self.scheduler.fail_running(f"generation failed: {exc!r}")
            else:
                self.scheduler.postprocess(batch, tokens)
        self._steps += 1
        self._last_step_s = time.monotonic()

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Sequence):
                if item.request_id in self._aborts:
                    self._aborts.discard(item.request_id)
                    self.scheduler.finish(item, "abort")
                else:
                    self.scheduler.add(item)
                continue
            _, request_id = item
            if not self.scheduler.abort(request_id):
                self._aborts.add(request_id)  # its Sequence may still be on the way to the inbox
        if len(self._aborts) > 10_000:
            self._aborts.clear()


def is_cuda_context_error(exc: BaseException) -> bool:
    """A device-side assert or illegal memory access: every later CUDA call fails too."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(exc, accelerator_error)) or "CUDA error" in str(exc)


def _deliver(items: list[tuple[asyncio.Queue, Delta]]) -> None:
    for out, delta in items:
        out.put_nowait(delta)

