"""Engine configuration: a frozen dataclass built once from the serving config."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import InvalidRequestError

DEFAULT_CUDA_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
DECODE_MODES = ("auto", "dynamic", "static")


@dataclass(frozen=True)
class EngineConfig:
    """What an engine needs to start. ``model`` is an artifact directory (see ``engines.build``),
    a Hugging Face model directory, a ``.gguf`` file, or a hub id (needs network access)."""

    model: str
    engine: str = "torch"
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else float32
    max_running_seqs: int = 32
    max_seq_len: int | None = None  # None: the model's own context length, bounded by kv_budget_tokens
    kv_budget_tokens: int = 32768
    max_waiting_seqs: int = 32  # beyond it: EngineOverloadedError at once (503), not a queue behind busy rows
    default_max_tokens: int = 512
    num_threads: int | None = None
    prefix_cache_tokens: int = 8192
    max_batched_tokens: int = 512  # tokens in one forward (decodes + prompt chunks): bounds a step's time
    max_queue_wait_s: float = 10.0  # a request not given a row by then gets EngineOverloadedError (503)
    # GPU replicas (engines/static_decode.py). The KV cache may take this share of the GPU memory free
    # after the weights load (and never more than kv_budget_tokens).
    gpu_memory_fraction: float = 0.9
    # Decode batch sizes captured as CUDA graphs (a step of n decoding rows runs at the smallest one
    # >= n); capped at max_running_seqs; empty: no graphs, decode steps run eagerly.
    cuda_graph_batch_sizes: tuple[int, ...] = DEFAULT_CUDA_GRAPH_BATCH_SIZES
    # auto: static (preallocated KV cache, fixed-shape decode, CUDA graphs) on CUDA, dynamic on CPU;
    # static on CPU runs the same fixed-shape decode eagerly (tests).
    decode_mode: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_running_seqs", "max_seq_len", "kv_budget_tokens", "max_waiting_seqs", "default_max_tokens",
                     "max_batched_tokens"):
            value = getattr(self, name)
            if (value is not None or name != "max_seq_len") and (not isinstance(value, int) or value < 1):
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}", name)
        if self.max_seq_len is not None and self.kv_budget_tokens < self.max_seq_len:
            raise InvalidRequestError(
                f"kv_budget_tokens ({self.kv_budget_tokens}) must hold at least one full sequence "
                f"(max_seq_len={self.max_seq_len})",
                "kv_budget_tokens",
            )
        if not self.max_queue_wait_s > 0:
            raise InvalidRequestError(f"max_queue_wait_s must be positive, got {self.max_queue_wait_s!r}",
                                      "max_queue_wait_s")
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidRequestError("num_threads must be >= 1", "num_threads")
        if self.prefix_cache_tokens < 0:
            raise InvalidRequestError("prefix_cache_tokens must be >= 0", "prefix_cache_tokens")
        if isinstance(self.gpu_memory_fraction, bool) or not isinstance(self.gpu_memory_fraction, (int, float)) \
                or not 0 < self.gpu_memory_fraction <= 1:
            raise InvalidRequestError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction!r}",
                                      "gpu_memory_fraction")
        sizes = self.cuda_graph_batch_sizes
        if isinstance(sizes, (list, tuple)):
            object.__setattr__(self, "cuda_graph_batch_sizes", sizes := tuple(sizes))
        if not isinstance(sizes, tuple) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes) \
                or len(set(sizes)) != len(sizes):
            raise InvalidRequestError(f"cuda_graph_batch_sizes must be distinct positive integers, got {sizes!r}",
                                      "cuda_graph_batch_sizes")
        object.__setattr__(self, "cuda_graph_batch_sizes", tuple(sorted(sizes)))
        if self.decode_mode not in DECODE_MODES:
            raise InvalidRequestError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {self.decode_mode!r}",
                                      "decode_mode")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}", "dtype")

    def resolve_max_seq_len(self, model_context_tokens: int | None) -> int:
        """The longest sequence (prompt + output) served: ``max_seq_len`` when set, else the model's
        own context length (``max_position_embeddings``); never more than the model's context nor
        than ``kv_budget_tokens``, so one sequence always fits the KV budget."""
        return min(n for n in (self.max_seq_len, model_context_tokens, self.kv_budget_tokens) if n)
