"""Row-per-sequence KV cache.

How this works: keys and values are two tensors ``(layers, rows, kv_heads, capacity, head_dim)``
(``keys[layer]`` is a view of one layer). Every running sequence owns one row; rows are kept compact
(running sequences sit in rows ``0..n-1``), so the decoding rows of a step are a leading slice and
attention reads the cache in place, never a gathered copy. The attention backend writes each new
token's key and value at ``(row, position)``; positions past a row's length hold zeros or stale
finite values that attention masks out (it may read them with weight 0, so they must never be NaN).

Memory is allocated lazily: the tensors grow (rows and capacity) as sequences are admitted and are
released when nothing runs. The scheduler's admission checks ``rows * capacity`` against the budget
before anything grows; growth never allocates past the budget.

Fixed mode (``allocate_fixed``; GPU replicas, ``decode_mode: static``): the tensors are allocated once
at start for ``rows`` full sequences of ``capacity`` positions and never reallocated nor released
until shutdown — CUDA graphs captured over them keep their addresses. ``reserve`` is then a no-op
(admission already keeps within the rows) and ``release`` keeps the memory.
"""

from __future__ import annotations

import torch

CAPACITY_ALIGN = 128

# A prefix-cache entry: keys and values of one row's first n positions, ``(layers, kv_heads, n, head_dim)``.
RowKV = tuple[torch.Tensor, torch.Tensor]


def aligned(value: int, align: int, limit: int) -> int:
    return min(limit, -(-value // align) * align)


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 max_rows: int, max_capacity: int):
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.max_rows = max_rows
        self.max_capacity = max_capacity
        self.fixed = False
        self.release()

    # -- sizing -----------------------------------------------------------------------------
    def capacity_for(self, length: int) -> int:
        """The capacity the cache allocates to hold sequences of up to ``length`` positions."""
        if self.fixed:
            return self.capacity
        return aligned(length, CAPACITY_ALIGN, self.max_capacity)

    def allocate_fixed(self, rows: int, capacity: int) -> None:
        """Allocate ``rows`` rows of ``capacity`` positions once, for good (see the module docstring)."""
        self.fixed = False
        self.release()
        self.max_rows = rows
        self.max_capacity = capacity
        self.reserve(rows, capacity, 0, rows * capacity)
        self.fixed = True

    @property
    def allocated_tokens(self) -> int:
        return self.rows * self.capacity

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def allocated_bytes(self) -> int:
        return self.allocated_tokens * self.bytes_per_token

    def reserve(self, rows: int, length: int, used_len: int, budget_tokens: int) -> None:
        """Make room for ``rows`` rows of ``length`` positions, keeping the first ``used_len``
        positions of rows ``0..rows-1``. Rows grow by doubling (within ``budget_tokens``) so most
        admissions copy nothing; capacity shrinks when it is over twice the need."""
        if self.fixed:
            if rows > self.rows or length > self.capacity:
                raise RuntimeError(f"fixed KV cache of {self.rows} rows x {self.capacity} positions cannot hold "
                                   f"{rows} rows of {length}")
            return
        cap = self.capacity_for(length)
        new_cap = cap if (cap > self.capacity or self.capacity > 2 * cap) else self.capacity
        row_limit = max(rows, min(self.max_rows, budget_tokens // new_cap))
        new_rows = min(max(rows, 2 * self.rows) if rows > self.rows else self.rows, row_limit)
        if (new_rows, new_cap) == (self.rows, self.capacity):
            return
        keep_rows, keep_len = min(rows, self.rows), min(used_len, new_cap, self.capacity)
        shape = (self.num_layers, new_rows, self.kv_heads, new_cap, self.head_dim)
        # Zeroed, not empty: attention reads masked positions too (with weight 0), and recycled memory
        # seen as bf16 can hold NaN/Inf bit patterns, which survive a zero weight (0 * NaN = NaN).
        fresh_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        fresh_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if keep_rows and keep_len:
            fresh_k[:, :keep_rows, :, :keep_len] = self._k[:, :keep_rows, :, :keep_len]
            fresh_v[:, :keep_rows, :, :keep_len] = self._v[:, :keep_rows, :, :keep_len]
        self._k, self._v = fresh_k, fresh_v
        self.keys, self.values = list(fresh_k.unbind(0)), list(fresh_v.unbind(0))
        self.rows, self.capacity = new_rows, new_cap

    def release(self, force: bool = False) -> None:
        """Free the tensors (a fixed cache only with ``force``, at shutdown)."""
        if self.fixed and not force:
            return
        self.fixed = False
        self._k = self._v = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = self.capacity = 0

    # -- rows -------------------------------------------------------------------------------
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` into row ``dst``."""
        if src == dst or length == 0:
            return
        self._k[:, dst, :, :length] = self._k[:, src, :, :length]
        self._v[:, dst, :, :length] = self._v[:, src, :, :length]

    def read_row(self, row: int, length: int) -> RowKV:
        """A copy of one row's first ``length`` positions (for the prefix cache)."""
        return self._k[:, row, :, :length].clone(), self._v[:, row, :, :length].clone()

    def write_row(self, row: int, kv: RowKV, length: int) -> None:
        k, v = kv
        self._k[:, row, :, :length] = k[:, :, :length]
        self._v[:, row, :, :length] = v[:, :, :length]
