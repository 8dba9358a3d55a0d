"""Engine configuration: a frozen dataclass built once from the serving config."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import InvalidRequestError


@dataclass(frozen=True)
class EngineConfig:
    """What an engine needs to start. ``model`` is an artifact directory (see ``engines.build``),
    a Hugging Face model directory, a ``.gguf`` file, or a hub id (needs network access)."""

    model: str
    engine: str = "torch"
    device: str = "auto"
    dtype: str = "float32"
    max_running_seqs: int = 32
    max_seq_len: int = 2048
    kv_budget_tokens: int = 32768
    max_waiting_seqs: int = 256
    default_max_tokens: int = 512
    num_threads: int | None = None
    prefix_cache_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("max_running_seqs", "max_seq_len", "kv_budget_tokens", "max_waiting_seqs", "default_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}", name)
        if self.kv_budget_tokens < self.max_seq_len:
            raise InvalidRequestError(
                f"kv_budget_tokens ({self.kv_budget_tokens}) must hold at least one full sequence "
                f"(max_seq_len={self.max_seq_len})",
                "kv_budget_tokens",
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidRequestError("num_threads must be >= 1", "num_threads")
        if self.prefix_cache_tokens < 0:
            raise InvalidRequestError("prefix_cache_tokens must be >= 0", "prefix_cache_tokens")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}", "dtype")
