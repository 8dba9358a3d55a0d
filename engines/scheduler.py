"""The scheduler: which sequences run, in which cache row, and how many tokens each reads this step.

How this works. Sequences wait in arrival order. **Admission** moves them into cache rows while the row
limit and the KV budget allow (a sequence reserves ``prompt + max_tokens`` positions when admitted, so
the engine never pre-empts); a prefix-cache hit copies the cached KV into the new row. Rows
``0..num_decoding-1`` hold sequences that are generating, the rows after them sequences still reading
their prompt. **Each step** (``schedule``) takes one token from every generating row, then fills the
step's token budget (``max_batched_tokens``) with prompt chunks in row order, so arrivals join the same
forward as the streams already running instead of stalling them. Only the last chunk of a step can
stop short of its prompt's end, so sequences that finish their prompt are the first prefill rows and
become generating rows without moving. **After the step** (``postprocess``) each sampled token goes
through the sequence's detokenizer and stop checks and out as a :class:`Delta`; **retirement** frees
the rows of finished and aborted sequences (keeping their KV in the prefix cache) and keeps both row
regions compact by moving the last row into the hole.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .detokenizer import IncrementalDetokenizer
from .kv_cache import KVCache
from .prefix_cache import PrefixCache
from .protocol import Delta, GenerationRequest, Usage
from .sampling import SAMPLING_FAILED

logger = logging.getLogger(__name__)


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
    queued_s: float = field(default_factory=time.monotonic)  # when it joined the waiting queue

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

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]


@dataclass
class ScheduledBatch:
    """One step's work: every decoding row's next token, then prompt chunks."""

    decode: list[Sequence]  # rows 0..len(decode)-1, in row order
    prefill: list[tuple[Sequence, int]]  # (sequence, prompt tokens to read), rows in order after the decode rows
    num_running: int = -1  # rows in use when scheduled (-1: unknown); == len(decode): every other row is free

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    @property
    def sampled(self) -> list[Sequence]:
        """Sequences that get a token from this step: all decoding rows, then prompts read to the end."""
        return self.decode + [s for s, n in self.prefill if s.num_computed + n == len(s.prompt_ids)]

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, kv: KVCache, prefix_cache: PrefixCache, eos_ids: set[int], *, max_running_seqs: int,
                 kv_budget_tokens: int, max_batched_tokens: int, min_prefill_tokens: int = 64,
                 max_queue_wait_s: float = float("inf")):
        self.kv = kv
        self.prefix_cache = prefix_cache
        self.eos_ids = eos_ids
        self.max_running_seqs = max_running_seqs
        self.kv_budget_tokens = kv_budget_tokens
        self.max_batched_tokens = max_batched_tokens
        self.min_prefill_tokens = min_prefill_tokens  # prompts progress even when decodes fill the budget
        self.max_queue_wait_s = max_queue_wait_s  # waiting longer than this: overloaded, answered at once
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == row
        self.num_decoding = 0
        self.by_id: dict[str, Sequence] = {}
        self.counters = dict(tokens_generated=0, requests_finished=0, requests_aborted=0, last_batch_size=0)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, seq: Sequence) -> None:
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Abort a known sequence (a running one leaves its row at the next retirement); False if unknown."""
        seq = self.by_id.get(request_id)
        if seq is None:
            return False
        if seq in self.waiting:
            self.waiting.remove(seq)
            self.finish(seq, "abort")
        else:
            seq.abort_requested = True
        return True

    # -- before the forward -----------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        self.retire()
        self._admit()
        decode = self.running[: self.num_decoding]
        budget = max(self.max_batched_tokens - len(decode), self.min_prefill_tokens)
        prefill = []
        for seq in self.running[self.num_decoding:]:
            if budget <= 0:
                break
            take = min(len(seq.prompt_ids) - seq.num_computed, budget)
            prefill.append((seq, take))
            budget -= take
        self.counters["last_batch_size"] = len(decode)
        return ScheduledBatch(decode, prefill, len(self.running))

    def _admit(self) -> None:
        """Move waiting sequences into rows while the row limit and the KV budget allow; those that
        waited longer than ``max_queue_wait_s`` leave, overloaded."""
        expired_before = time.monotonic() - self.max_queue_wait_s
        while self.waiting and self.waiting[0].queued_s < expired_before:
            self.finish(self.waiting.popleft(), "error", kind="overloaded",
                        error=f"no room for {self.max_queue_wait_s:g} s: every row was busy")
        budget = self.kv_budget_tokens
        length = max((s.reserved_len for s in self.running), default=0)
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_running_seqs:
            seq = self.waiting[0]
            new_length = max(length, seq.reserved_len)
            if (len(self.running) + 1) * self.kv.capacity_for(new_length) > budget and self.running:
                break
            self.waiting.popleft()
            length = new_length
            seq.row = len(self.running)
            self.running.append(seq)
            admitted.append(seq)
        if not admitted:
            return
        used = max(s.num_computed for s in self.running)
        self.kv.reserve(len(self.running), length, used, budget)
        for seq in admitted:
            if not seq.request.use_prefix_cache:
                continue
            hit = self.prefix_cache.lookup(seq.prompt_ids)
            if hit is not None:
                reused, kv = hit
                self.kv.write_row(seq.row, kv, reused)
                seq.num_computed = seq.cached_tokens = reused

    # -- after the forward ------------------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, tokens: list[int]) -> None:
        """Advance what the step computed, hand out its tokens, retire what finished."""
        sampled = batch.sampled
        for seq in batch.decode:
            seq.num_computed += 1
        for seq, take in batch.prefill:
            seq.num_computed += take
        # Prompts read to the end are the first prefill rows: they join the decoding rows in place.
        self.num_decoding += len(sampled) - len(batch.decode)
        self._accept_tokens(sampled, tokens)
        self.retire()

    def _accept_tokens(self, seqs: list[Sequence], tokens: list[int]) -> None:
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.finish_reason is not None or seq.abort_requested:
                continue
            try:
                self._accept(seq, token)
            except Exception as exc:  # noqa: BLE001 - this sequence fails, not its batch
                logger.exception("sequence %s failed", seq.request_id)
                self.finish(seq, "error", kind="failed", error=f"generation failed: {exc!r}")

    def _accept(self, seq: Sequence, token: int) -> None:
        if token == SAMPLING_FAILED:
            raise RuntimeError("no token could be sampled: the model's scores for this sequence are not numbers")
        seq.output_ids.append(token)
        seq.unsent += 1
        self.counters["tokens_generated"] += 1
        if token in self.eos_ids and not seq.request.sampling.ignore_eos:
            self.finish(seq, "stop")
            return
        text = seq.detokenizer.add_token(token)
        if seq.detokenizer.stopped:
            self.finish(seq, "stop", text)
        elif len(seq.output_ids) >= seq.max_tokens:
            self.finish(seq, "length", text)
        elif text:
            seq.emit(Delta(seq.request_id, text, take_unsent(seq)))

    def finish(self, seq: Sequence, reason: str, text: str = "", error: str | None = None,
               kind: str | None = None) -> None:
        """Send the final delta once; the row is freed by the next :meth:`retire`. With ``error``,
        ``kind`` says what failed (``Delta.error_kind``; default ``dead``)."""
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        if reason in ("stop", "length"):
            text += seq.detokenizer.finish()
        usage = Usage(len(seq.prompt_ids), len(seq.output_ids), seq.cached_tokens)
        seq.emit(Delta(seq.request_id, text, take_unsent(seq), finish_reason=reason, usage=usage, error=error,
                       error_kind=(kind or "dead") if error is not None else None))
        self.counters["requests_aborted" if reason == "abort" else "requests_finished"] += 1
        self.by_id.pop(seq.request_id, None)

    def fail_running(self, error: str) -> None:
        for seq in self.running:
            self.finish(seq, "error", error=error)
        self.retire()

    def fail_all(self, reason: str, error: str | None = None) -> None:
        for seq in list(self.by_id.values()):
            self.finish(seq, reason, error=error)

    def retire(self) -> None:
        """Free the rows of finished and aborted sequences, keeping both row regions compact."""
        for seq in [s for s in self.running if s.finish_reason is not None or s.abort_requested]:
            self.finish(seq, "abort")  # no-op unless only the abort was pending
            if seq.finish_reason in ("stop", "length") and seq.request.use_prefix_cache and self.prefix_cache.budget_tokens:
                self.prefix_cache.insert(seq.all_ids[: seq.num_computed], self.kv.read_row(seq.row, seq.num_computed))
            self._remove_row(seq.row)

    def _remove_row(self, row: int) -> None:
        last = len(self.running) - 1
        if row < self.num_decoding:
            tail = self.num_decoding - 1
            self._move(tail, row)
            self._move(last, tail)
            self.num_decoding -= 1
        else:
            self._move(last, row)
        self.running.pop()

    def _move(self, src: int, dst: int) -> None:
        if src == dst:
            return
        seq = self.running[src]
        self.kv.move_row(src, dst, seq.num_computed)
        seq.row = dst
        self.running[dst] = seq


def take_unsent(seq: Sequence) -> tuple[int, ...]:
    ids = tuple(seq.output_ids[len(seq.output_ids) - seq.unsent:]) if seq.unsent else ()
    seq.unsent = 0
    return ids
