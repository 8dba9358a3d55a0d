"""TorchEngine: a transformers model behind an iteration-level (continuous) batching loop.

How this works. One thread runs the step loop::

    self._drain_inbox()                       # new requests join the waiting queue, aborts are marked
    self._admit()                             # waiting -> running while rows and the KV budget allow
    self._prefill()                           # a chunk of every prompt still being read, batched
    self._decode()                            # one token for every sequence that has read its prompt
    self._retire()                            # finished and aborted sequences leave; rows compacted

Sequences join and leave at every step, so a new request waits at most one step, never for a batch
to drain. Each running sequence owns a row of :class:`RowKVCache`; rows ``0..n_decoding-1`` hold
sequences that are generating, the rows after them sequences whose prompt is still being read.
Prompts are read in chunks of at most ``max_prefill_tokens_per_step`` tokens so a long prompt does
not stall everybody else's tokens for seconds. A sequence reserves ``prompt + max_tokens`` positions
when admitted, so the engine never has to pre-empt.

Outputs cross to the asyncio side with ``loop.call_soon_threadsafe`` into one queue per request;
``generate`` is an async iterator over that queue and aborts the request if the caller stops early.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

import torch

from .artifacts import load_model
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .kv_cache import RowKVCache
from .prefix_cache import PrefixCache
from .protocol import (
    Delta,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    EngineStats,
    GenerationRequest,
    InvalidRequestError,
    Usage,
)
from .sampling import sample_next_tokens

logger = logging.getLogger(__name__)

STUCK_AFTER_S = 120.0
MAX_PREFILL_TOKENS_PER_STEP = 512


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    max_tokens: int
    detokenizer: IncrementalDetokenizer
    emit: object  # callable(Delta) -> None, thread-safe
    generator: torch.Generator | None
    row: int = -1
    num_computed: int = 0  # positions whose KV is in the cache
    cached_tokens: int = 0  # positions taken from the prefix cache
    output_ids: list[int] = field(default_factory=list)
    unsent: int = 0  # trailing output tokens not yet carried by a delta
    finish_reason: str | None = None
    abort_requested: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def reserved_len(self) -> int:
        return len(self.prompt_ids) + self.max_tokens

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


class TorchEngine:
    """See the module docstring. Construct with an :class:`EngineConfig`, then :meth:`start`."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model = None
        self.tokenizer = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # index == row
        self._num_decoding = 0
        self._by_id: dict[str, Sequence] = {}
        self._aborts: set[str] = set()
        self._last_step_s = time.monotonic()
        self._counters = dict(steps=0, tokens_generated=0, requests_finished=0, requests_aborted=0, last_batch_size=0)
        self._loop_error: BaseException | None = None
        self.load_seconds = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        threads = self.config.num_threads or int(os.environ.get("ENGINE_NUM_THREADS", "0")) or os.cpu_count() or 1
        torch.set_num_threads(threads)
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        started = time.perf_counter()
        self.model, self.tokenizer, self.target = load_model(self.config.model, self.config.dtype, device)
        self.load_seconds = time.perf_counter() - started
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_seq_len = min(self.config.max_seq_len, getattr(cfg, "max_position_embeddings", 1 << 30))
        self.kv = RowKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, self.model.dtype,
                             self.device, self.config.max_running_seqs, self.max_seq_len)
        self.prefix_cache = PrefixCache(self.config.prefix_cache_tokens)
        self.eos_ids = self._eos_token_ids()
        vocab = self.model.config.vocab_size  # a tokenizer may name ids the model has no logits for
        self._banned_if_ignore_eos = torch.tensor(
            sorted(i for i in self.eos_ids | set(self.tokenizer.all_special_ids) if 0 <= i < vocab),
            dtype=torch.long, device=self.device)
        self._decoder = self.model.get_decoder()
        self._lm_head = self.model.get_output_embeddings()
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()
        logger.info("engine started: model=%s load=%.2fs threads=%d device=%s", self.config.model,
                    self.load_seconds, threads, self.device)

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for seq in list(self._by_id.values()):
            self._finish(seq, "abort")
        self.kv.release()

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for value in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(value)
        return ids

    # -- the asyncio side -----------------------------------------------------------------------
    def prompt_ids_for(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            vocab = self.model.config.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in request.prompt_token_ids):
                raise InvalidRequestError(f"prompt_token_ids must be ints in [0, {vocab})", "prompt_token_ids")
            return list(request.prompt_token_ids)
        return self.apply_chat_template(list(request.messages))

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def _make_sequence(self, request: GenerationRequest, emit) -> Sequence:
        if self._loop_error is not None or self._thread is None or not self._thread.is_alive():
            raise EngineDeadError(f"engine loop is not running: {self._loop_error!r}")
        prompt_ids = self.prompt_ids_for(request)
        room = self.max_seq_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"prompt is {len(prompt_ids)} tokens; this model serves at most {self.max_seq_len} tokens "
                "per sequence (prompt + output)", "messages")
        wanted = request.sampling.max_tokens
        if wanted is not None and wanted > room:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({wanted}) exceeds the limit of "
                f"{self.max_seq_len} tokens per sequence", "max_tokens")
        max_tokens = wanted if wanted is not None else min(room, self.config.default_max_tokens)
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
                seq = self._make_sequence(request, partial(loop.call_soon_threadsafe, out.put_nowait))
                if len(self._waiting) + self._inbox.qsize() >= self.config.max_waiting_seqs:
                    raise EngineOverloadedError(f"waiting queue is full ({self.config.max_waiting_seqs} requests)")
            except EngineError as exc:
                results.append(exc)
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
                if delta.error is not None:
                    finished = True
                    raise EngineDeadError(delta.error)
                yield delta
                if delta.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def check_health(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError(f"engine loop is not running: {self._loop_error!r}")
        busy = bool(self._running or self._waiting)
        stalled_s = time.monotonic() - self._last_step_s
        if busy and stalled_s > STUCK_AFTER_S:
            raise EngineDeadError(f"engine loop made no step for {stalled_s:.0f}s while busy")

    def stats(self) -> EngineStats:
        c = self._counters
        return EngineStats(
            running=len(self._running), waiting=len(self._waiting) + self._inbox.qsize(),
            max_running=self.config.max_running_seqs, kv_budget_tokens=self.config.kv_budget_tokens,
            kv_allocated_tokens=self.kv.allocated_tokens, kv_bytes=self.kv.allocated_bytes,
            steps=c["steps"], tokens_generated=c["tokens_generated"], requests_finished=c["requests_finished"],
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
                    if not self._running and not self._waiting:
                        self._last_step_s = time.monotonic()
                        if self.kv.rows:
                            self.kv.release()
                        self._wakeup.wait(timeout=0.5)
                        self._wakeup.clear()
                        continue
                    self.step()
        except BaseException as exc:  # noqa: BLE001 - the loop must report whatever killed it
            logger.exception("engine loop died")
            self._loop_error = exc
            for seq in list(self._by_id.values()):
                self._finish(seq, "error", error=f"engine loop died: {exc!r}")

    def step(self) -> None:
        """One iteration: admit, read prompt chunks, decode one token each, retire."""
        self._admit()
        try:
            self._prefill()
            self._retire()
            self._decode()
        except Exception as exc:  # a failed forward fails the sequences in it, not the engine
            logger.exception("forward failed; failing %d running sequences", len(self._running))
            for seq in self._running:
                self._finish(seq, "error", error=f"generation failed: {exc!r}")
        self._retire()
        self._counters["steps"] += 1
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
                    self._finish(item, "abort")
                    continue
                self._by_id[item.request_id] = item
                self._waiting.append(item)
                continue
            _, request_id = item
            seq = self._by_id.get(request_id)
            if seq is None:
                self._aborts.add(request_id)  # its Sequence may still be on the way to the inbox
            elif seq in self._waiting:
                self._waiting.remove(seq)
                self._finish(seq, "abort")
            else:
                seq.abort_requested = True  # leaves its row at the next _retire
        if len(self._aborts) > 10_000:
            self._aborts.clear()

    def _admit(self) -> None:
        """Move waiting sequences into rows while the row limit and the KV budget allow."""
        budget = self.config.kv_budget_tokens
        length = max((s.reserved_len for s in self._running), default=0)
        admitted: list[Sequence] = []
        while self._waiting and len(self._running) < self.config.max_running_seqs:
            seq = self._waiting[0]
            new_length = max(length, seq.reserved_len)
            if (len(self._running) + 1) * self.kv.capacity_for(new_length) > budget and self._running:
                break
            self._waiting.popleft()
            length = new_length
            seq.row = len(self._running)
            self._running.append(seq)
            admitted.append(seq)
        if not admitted:
            return
        used = max(s.num_computed for s in self._running)
        self.kv.reserve(len(self._running), length, used, budget)
        for seq in admitted:
            if not seq.request.use_prefix_cache:
                continue
            hit = self.prefix_cache.lookup(seq.prompt_ids)
            if hit is not None:
                reused, kv = hit
                self.kv.write_row(seq.row, kv, reused)
                seq.num_computed = seq.cached_tokens = reused

    def _forward(self, row_start: int, input_ids: torch.Tensor, starts: torch.Tensor,
                 lengths: torch.Tensor) -> torch.Tensor:
        """Run the model on rows ``row_start..``; row i reads ``lengths[i]`` tokens of its
        right-padded ``input_ids`` from position ``starts[i]``. Returns each row's last logits."""
        batch, width = input_ids.shape
        self.kv.plan(row_start, starts, lengths, width)
        offsets = torch.arange(width, device=self.device)[None, :]
        # Padding queries repeat the last real position: they see only real keys (no empty
        # softmax rows) and their outputs are dropped.
        positions = starts[:, None] + torch.minimum(offsets, (lengths - 1)[:, None])
        key_pos = torch.arange(self.kv.kv_len, device=self.device)
        mask = key_pos[None, None, None, :] <= positions[:, None, :, None]
        hidden = self._decoder(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                               past_key_values=self.kv, use_cache=True).last_hidden_state
        last = hidden[torch.arange(batch, device=self.device), lengths - 1]
        return self._lm_head(last).float()

    def _prefill(self) -> None:
        first = self._num_decoding
        chunks: list[tuple[Sequence, int]] = []
        budget = MAX_PREFILL_TOKENS_PER_STEP
        for seq in self._running[first:]:
            if budget <= 0:
                break
            take = min(len(seq.prompt_ids) - seq.num_computed, budget)
            chunks.append((seq, take))
            budget -= take
        if not chunks:
            return
        width = max(take for _, take in chunks)
        ids = torch.zeros((len(chunks), width), dtype=torch.long)
        for i, (seq, take) in enumerate(chunks):
            ids[i, :take] = torch.tensor(seq.prompt_ids[seq.num_computed: seq.num_computed + take])
        starts = torch.tensor([seq.num_computed for seq, _ in chunks])
        lengths = torch.tensor([take for _, take in chunks])
        logits = self._forward(first, ids.to(self.device), starts.to(self.device), lengths.to(self.device))
        done = []
        for i, (seq, take) in enumerate(chunks):
            seq.num_computed += take
            if not seq.prefilling:
                done.append(i)
        if done:
            # Completed prompts are exactly the first rows of the prefill region (only the last
            # chunk may be partial), so they join the decoding rows without moving.
            seqs = [chunks[i][0] for i in done]
            self._num_decoding += len(done)
            self._accept_tokens(seqs, sample_next_tokens(logits[done], seqs, self._banned_if_ignore_eos))

    def _decode(self) -> None:
        seqs = self._running[: self._num_decoding]
        if not seqs:
            return
        ids = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.device)
        starts = torch.tensor([s.num_computed for s in seqs], device=self.device)
        logits = self._forward(0, ids, starts, torch.ones(len(seqs), dtype=torch.long, device=self.device))
        for s in seqs:
            s.num_computed += 1
        self._counters["last_batch_size"] = len(seqs)
        self._accept_tokens(seqs, sample_next_tokens(logits, seqs, self._banned_if_ignore_eos))

    def _accept_tokens(self, seqs: list[Sequence], tokens: list[int]) -> None:
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.finish_reason is not None or seq.abort_requested:
                continue
            seq.output_ids.append(token)
            seq.unsent += 1
            self._counters["tokens_generated"] += 1
            if token in self.eos_ids and not seq.request.sampling.ignore_eos:
                self._finish(seq, "stop")
                continue
            text = seq.detokenizer.add_token(token)
            if seq.detokenizer.stopped:
                self._finish(seq, "stop", text)
            elif len(seq.output_ids) >= seq.max_tokens:
                self._finish(seq, "length", text)
            elif text:
                seq.emit(Delta(seq.request_id, text, self._take_unsent(seq)))

    def _finish(self, seq: Sequence, reason: str, text: str = "", error: str | None = None) -> None:
        """Send the final delta once; the row is freed by the next :meth:`_retire`."""
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        if reason in ("stop", "length"):
            text += seq.detokenizer.finish()
        usage = Usage(len(seq.prompt_ids), len(seq.output_ids), seq.cached_tokens)
        seq.emit(Delta(seq.request_id, text, self._take_unsent(seq), finish_reason=reason, usage=usage, error=error))
        self._counters["requests_aborted" if reason == "abort" else "requests_finished"] += 1
        self._by_id.pop(seq.request_id, None)

    @staticmethod
    def _take_unsent(seq: Sequence) -> tuple[int, ...]:
        ids = tuple(seq.output_ids[len(seq.output_ids) - seq.unsent:]) if seq.unsent else ()
        seq.unsent = 0
        return ids

    def _retire(self) -> None:
        """Free the rows of finished and aborted sequences, keeping both row regions compact."""
        for seq in [s for s in self._running if s.finish_reason is not None or s.abort_requested]:
            self._finish(seq, "abort")  # no-op unless only the abort was pending
            if seq.finish_reason in ("stop", "length") and seq.request.use_prefix_cache and self.prefix_cache.budget_tokens:
                self.prefix_cache.insert(seq.all_ids[: seq.num_computed], self.kv.read_row(seq.row, seq.num_computed))
            self._remove_row(seq.row)

    def _remove_row(self, row: int) -> None:
        last = len(self._running) - 1
        if row < self._num_decoding:
            tail = self._num_decoding - 1
            self._move(tail, row)
            self._move(last, tail)
            self._num_decoding -= 1
        else:
            self._move(last, row)
        self._running.pop()

    def _move(self, src: int, dst: int) -> None:
        if src == dst:
            return
        seq = self._running[src]
        self.kv.move_row(src, dst, seq.num_computed)
        seq.row = dst
        self._running[dst] = seq
