"""Row-per-sequence KV cache for iteration-level batching.

How this works: each layer owns one key and one value tensor shaped
``(rows, kv_heads, capacity, head_dim)``. Every running sequence owns one row; rows are kept
compact (running sequences sit in rows ``0..n-1``), so the batch for a forward pass is always a
contiguous slice and the attention reads a view, never a gathered copy. Before a forward the engine
calls :meth:`plan` with the first row and each row's write position; the model then calls
:meth:`update` once per layer (the Hugging Face ``Cache`` contract), which scatters the new keys and
values at those positions and returns the row slice up to the longest position. Positions beyond a
row's length may hold stale values (right padding of a batched prefill, or a retired sequence);
the causal mask never lets a query see a key past its own position, so they are never read.

Memory is allocated lazily: the tensors grow (rows and capacity) as sequences are admitted and are
released when nothing runs. The engine's admission checks ``rows * capacity`` against the budget
before anything grows; growth never allocates past the budget.
"""

from __future__ import annotations

import torch

CAPACITY_ALIGN = 128


def aligned(value: int, align: int, limit: int) -> int:
    return min(limit, -(-value // align) * align)


class RowKVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 max_rows: int, max_capacity: int):
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.max_rows = max_rows
        self.max_capacity = max_capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0
        self.capacity = 0
        # Set by plan() for the forward pass in progress.
        self._row_index: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._row_start = 0
        self._kv_len = 0

    # -- sizing -----------------------------------------------------------------------------
    def capacity_for(self, length: int) -> int:
        """The capacity the cache allocates to hold sequences of up to ``length`` positions."""
        return aligned(length, CAPACITY_ALIGN, self.max_capacity)

    @property
    def allocated_tokens(self) -> int:
        return self.rows * self.capacity

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def allocated_bytes(self) -> int:
        return self.rows * (self.capacity + 1) * self.bytes_per_token if self.rows else 0

    def reserve(self, rows: int, length: int, used_len: int, budget_tokens: int) -> None:
        """Make room for ``rows`` rows of ``length`` positions, keeping the first ``used_len``
        positions of rows ``0..rows-1``. Rows grow by doubling (within ``budget_tokens``) so most
        admissions copy nothing; capacity shrinks when it is over twice the need."""
        cap = self.capacity_for(length)
        new_cap = cap if (cap > self.capacity or self.capacity > 2 * cap) else self.capacity
        row_limit = max(rows, min(self.max_rows, budget_tokens // new_cap))
        new_rows = min(max(rows, 2 * self.rows) if rows > self.rows else self.rows, row_limit)
        if (new_rows, new_cap) == (self.rows, self.capacity):
            return
        keep_rows, keep_len = min(rows, self.rows), min(used_len, new_cap, self.capacity)
        shape = (new_rows, self.kv_heads, new_cap + 1, self.head_dim)  # +1: the scratch column
        for store in (self.keys, self.values):
            for layer in range(self.num_layers):
                fresh = torch.empty(shape, dtype=self.dtype, device=self.device)
                if store and keep_rows and keep_len:
                    fresh[:keep_rows, :, :keep_len] = store[layer][:keep_rows, :, :keep_len]
                if len(store) > layer:
                    store[layer] = fresh
                else:
                    store.append(fresh)
        self.rows, self.capacity = new_rows, new_cap

    def release(self) -> None:
        self.keys, self.values = [], []
        self.rows = self.capacity = 0

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` into row ``dst``."""
        if src == dst or length == 0:
            return
        for layer in range(self.num_layers):
            self.keys[layer][dst, :, :length] = self.keys[layer][src, :, :length]
            self.values[layer][dst, :, :length] = self.values[layer][src, :, :length]

    def read_row(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of one row's first ``length`` positions, per layer (for the prefix cache)."""
        return [(self.keys[i][row, :, :length].clone(), self.values[i][row, :, :length].clone())
                for i in range(self.num_layers)]

    def write_row(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        for i, (k, v) in enumerate(kv):
            self.keys[i][row, :, :length] = k[:, :length]
            self.values[i][row, :, :length] = v[:, :length]

    # -- one forward pass -------------------------------------------------------------------
    def plan(self, row_start: int, starts: torch.Tensor, lengths: torch.Tensor, width: int) -> None:
        """Prepare a forward over rows ``row_start .. row_start+B-1``: row ``i`` writes ``lengths[i]``
        new positions from ``starts[i]``; its input is right-padded to ``width`` and the padding's
        keys and values go to a scratch column past ``capacity`` that attention never reads."""
        batch = starts.shape[0]
        offsets = torch.arange(width, device=self.device)[None, :]
        self._row_start = row_start
        self._row_index = torch.arange(row_start, row_start + batch, device=self.device)[:, None]
        self._positions = torch.where(offsets < lengths[:, None], starts[:, None] + offsets, self.capacity)
        self._kv_len = int((starts + lengths).max())
        if self._kv_len > self.capacity or row_start + batch > self.rows:
            raise RuntimeError("KV cache too small for the planned forward; reserve() first")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = slice(self._row_start, self._row_start + key_states.shape[0])
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # (B, H, T, D) -> (B, T, H, D) to match the advanced-indexed destination layout.
        keys[self._row_index, :, self._positions] = key_states.transpose(1, 2)
        values[self._row_index, :, self._positions] = value_states.transpose(1, 2)
        return keys[rows, :, : self._kv_len], values[rows, :, : self._kv_len]

    @property
    def kv_len(self) -> int:
        """Key positions the planned forward attends over (the longest row's end)."""
        return self._kv_len

    # The pieces of the Hugging Face Cache interface that model code may consult.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    @property
    def is_compileable(self) -> bool:
        return False
