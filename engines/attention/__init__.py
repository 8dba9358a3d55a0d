"""Attention backends, registered by name; a backend's module is imported only when chosen.

The model calls a backend twice per step: ``prepare(metadata)`` once, then ``forward(layer, q, k, v)``
per layer. A backend owns how keys and values are written to the KV cache and read back, so a GPU
backend (flash-attention varlen with a block table, CUDA graphs) can replace the CPU one without the
model code changing. The flat token batch is always laid out the same way: first one token for
each decoding row (rows ``0..num_decode_rows-1``, in row order), then each prefill chunk's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..kv_cache import KVCache


@dataclass(frozen=True)
class PrefillChunk:
    """``num_tokens`` prompt tokens of cache row ``row`` at positions ``start..``; they sit at
    ``token_offset..`` of the flat batch."""

    row: int
    start: int
    num_tokens: int
    token_offset: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class AttentionMetadata:
    """What one step's attention needs to know, built by the model runner."""

    decode_lengths: tuple[int, ...]  # decoding row i attends over keys 0..decode_lengths[i]-1 (its own included)
    prefills: tuple[PrefillChunk, ...]
    write_rows: torch.Tensor  # (T,) cache row of each token of the flat batch
    write_positions: torch.Tensor  # (T,) position of each token

    @property
    def num_decode_rows(self) -> int:
        return len(self.decode_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.write_rows.shape[0])


class AttentionBackend(Protocol):
    kv: KVCache

    def prepare(self, metadata: AttentionMetadata) -> None:
        """Once per step, before the first layer: masks, plans, index tensors."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write ``k``, ``v`` (``(T, kv_heads, head_dim)``) to the cache, attend with ``q``
        (``(T, heads, head_dim)``); return ``(T, heads * head_dim)``."""


_BACKENDS: dict[str, Callable[..., AttentionBackend]] = {}


def register(name: str):
    def wrap(factory):
        _BACKENDS[name] = factory
        return factory

    return wrap


def create_attention_backend(name: str, kv: KVCache, num_heads: int, head_dim: int) -> AttentionBackend:
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(sorted(_BACKENDS))}") from None
    return factory(kv, num_heads, head_dim)


@register("torch")
def _create_torch(kv: KVCache, num_heads: int, head_dim: int) -> AttentionBackend:
    from .torch_sdpa import TorchAttention

    return TorchAttention(kv, num_heads, head_dim)
