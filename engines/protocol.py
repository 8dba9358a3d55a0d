"""The engine contract: what a serving backend takes, what it streams back, how it fails.

Every backend (``torch`` on CPU or GPU, ``trtllm`` on NVIDIA GPUs) implements :class:`Engine`.
A request goes in as a :class:`GenerationRequest`; ``generate`` returns an async iterator of
:class:`Delta` objects, one per step that produced visible text or finished the sequence. The last
delta has ``finish_reason`` set and carries ``usage``. Errors reach the caller as exceptions raised
from the iterator (or from ``generate`` itself for requests that are invalid before any work):

- :class:`InvalidRequestError` (a ``ValueError``): the request can never succeed as sent
  (bad sampling value, prompt too long). Nothing was computed.
- :class:`EngineOverloadedError`: the waiting queue is full, or a request waited in it longer than
  the engine's queue time bound; retry later.
- :class:`EngineDeadError`: the engine loop crashed; the replica should be replaced.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "abort", "error"]
MAX_SEED = 2**63 - 1
GREEDY_BELOW = 1e-5  # logits / temperature must stay finite in float32


class EngineError(Exception):
    """Base of all errors an engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request is malformed or cannot fit; ``field`` names the offending input."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class EngineOverloadedError(EngineError):
    """The engine's waiting queue is full."""


class EngineDeadError(EngineError):
    """The engine's step loop is not running."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. A temperature of 0 (or below ``GREEDY_BELOW``, where dividing logits by
    it would overflow) means greedy; ``top_p`` and ``seed`` are then unused."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # never pick EOS or another special token: text until max_tokens (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError(f"temperature must be in [0, 2], got {self.temperature!r}", "temperature")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}", "seed")
        if len(self.stop) > 8:
            raise InvalidRequestError("at most 8 stop strings are allowed", "stop")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. Give either chat ``messages`` (rendered with the model's chat
    template) or ready ``prompt_token_ids``."""

    messages: tuple[dict, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    use_prefix_cache: bool = True  # False: neither reuse cached KV nor keep this sequence's KV

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt_token_ids is None):
            raise InvalidRequestError("give exactly one of messages or prompt_token_ids", "messages")
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(self.messages))
            if not self.messages:
                raise InvalidRequestError("messages must not be empty", "messages")
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InvalidRequestError(f"messages[{i}] must have string 'role' and 'content'", "messages")
        if self.prompt_token_ids is not None:
            object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
            if not self.prompt_token_ids:
                raise InvalidRequestError("prompt_token_ids must not be empty", "prompt_token_ids")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """A piece of one request's output. ``text`` may be empty (e.g. held back while a stop string
    or a multi-byte character is still incomplete); ``token_ids`` are the tokens this delta covers."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = None
    # With ``error``, what failed: the engine (``dead``: EngineDeadError), the wait for a place
    # (``overloaded``: EngineOverloadedError), or this sequence alone (``failed``: EngineError).
    error_kind: Literal["dead", "overloaded", "failed"] | None = None
    served_by: str | None = None  # set by the serving layer on the last delta: the replica's id

    def then(self, later: Delta) -> Delta:
        """One delta carrying this one and ``later`` (which may be the final one)."""
        return Delta(self.request_id, self.text + later.text, self.token_ids + later.token_ids,
                     finish_reason=later.finish_reason, usage=later.usage, error=later.error,
                     error_kind=later.error_kind, served_by=later.served_by)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's state and counters since start."""

    running: int
    waiting: int
    max_running: int
    kv_budget_tokens: int
    kv_allocated_tokens: int
    kv_bytes: int
    steps: int
    tokens_generated: int
    requests_finished: int
    requests_aborted: int
    last_batch_size: int
    loop_alive: bool
    seconds_since_last_step: float
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0
    prefix_cache_reused_tokens: int = 0
    prefix_cache_tokens: int = 0
    prefix_cache_budget_tokens: int = 0


@runtime_checkable
class Engine(Protocol):
    """What every backend provides. All methods are safe to call from an asyncio event loop."""

    def start(self) -> None:
        """Load weights and start the step loop. Returns once the engine accepts requests."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Queue ``request`` and stream its deltas. Raises :class:`InvalidRequestError` at once for a
        request that cannot be served. Closing the iterator early aborts the request."""

    def abort(self, request_id: str) -> None:
        """Stop a request; its slot is freed at the next step. Unknown ids are ignored."""

    def check_health(self) -> None:
        """Raise :class:`EngineDeadError` if the step loop is dead or stuck."""

    def stats(self) -> EngineStats:
        """Counters and gauges for metrics and the ops page."""

    def shutdown(self) -> None:
        """Stop the loop and release memory. Pending requests finish with ``abort``."""


@runtime_checkable
class BatchSubmit(Protocol):
    """Optional: admit several requests in one go (used by the model replica's ``@serve.batch``)."""

    def submit(self, requests: list[GenerationRequest]) -> list[AsyncIterator[Delta] | EngineError]:
        """Per request, its delta stream (to be iterated or closed) or the error that rejected it."""
