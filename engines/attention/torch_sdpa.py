"""Attention in plain torch ops, for any device (the CPU default).

How this works. Decode (one query per row): the query heads of a KV head are grouped, so
``q (rows, kv_heads, group, head_dim) @ K^T`` is one batched matmul straight on a view of the cache
(rows are compact and the cache is ``(rows, kv_heads, capacity, head_dim)``, so the view needs no copy
and K/V are never repeated per query head). Rows have different lengths: the batch reads every row to
a common length ``dense_len`` with the keys past a row's own length masked out, and rows longer than
``dense_len`` (a long conversation among short ones) are done one by one on their own length.
``plan_decode`` picks ``dense_len`` to minimize keys read plus a per-row call cost, so one long row never
makes every row read its length, and equal lengths give one batched call. Read lengths are rounded up
to a multiple of 32 (masked), so the matmul shapes repeat from step to step. Scores and softmax are in
float32. Prefill chunks use ``scaled_dot_product_attention`` per chunk over the row's cache (earlier
chunks and prefix-cache hits included), causal with the chunk's offset, GQA without repeating K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kv_cache import KVCache
from . import AttentionMetadata

# Keys a single-row call "costs" in the plan: its fixed overhead expressed as extra keys read.
ROW_CALL_COST_KEYS = 256
# Read lengths are rounded up to a multiple of this (the extra keys masked): oneDNN builds a kernel per
# matmul shape, ~0.8 ms per new shape, and an exact length would be a new shape at every step.
READ_LEN_ALIGN = 32


def read_len(length: int, capacity: int) -> int:
    return min(capacity, -(-length // READ_LEN_ALIGN) * READ_LEN_ALIGN)


def length_bias(lengths: torch.Tensor, read: int) -> torch.Tensor:
    """``(rows, 1, 1, read)`` float32: 0 for a row's keys, -inf past its length."""
    keys = torch.arange(read, device=lengths.device)
    bias = torch.zeros((lengths.shape[0], 1, 1, read), dtype=torch.float32, device=lengths.device)
    return bias.masked_fill_((keys[None, :] >= lengths[:, None])[:, None, None, :], float("-inf"))


def plan_decode(lengths: tuple[int, ...], row_call_cost: int = ROW_CALL_COST_KEYS) -> tuple[int, list[int]]:
    """``(dense_len, long_rows)``: the batched read length and the rows done alone (longer than it)."""
    if not lengths:
        return 0, []
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(lengths)
    best_cost, best_k = None, n - 1
    tail = 0  # cost of the rows above position k, each alone
    for k in range(n - 1, -1, -1):
        cost = n * lengths[order[k]] + tail
        if best_cost is None or cost < best_cost:
            best_cost, best_k = cost, k
        tail += lengths[order[k]] + row_call_cost
    return lengths[order[best_k]], sorted(order[best_k + 1:])


class TorchAttention:
    def __init__(self, kv: KVCache, num_heads: int, head_dim: int):
        self.kv = kv
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.group = num_heads // kv.kv_heads
        self.scale = head_dim ** -0.5

    def prepare(self, metadata: AttentionMetadata) -> None:
        self.meta = metadata
        device = self.kv.device
        dense_len, self.long_rows = plan_decode(metadata.decode_lengths)
        self.dense_len = read_len(dense_len, self.kv.capacity)
        self.decode_bias = None
        if metadata.num_decode_rows:
            lengths = torch.tensor(metadata.decode_lengths, device=device).clamp_(max=self.dense_len)
            if int(lengths.min()) < self.dense_len:
                self.decode_bias = length_bias(lengths, self.dense_len)
        self.long_row_bias = {row: length_bias(torch.tensor([metadata.decode_lengths[row]], device=device),
                                               read_len(metadata.decode_lengths[row], self.kv.capacity))
                              for row in self.long_rows}
        self.prefill_masks = []
        for chunk in metadata.prefills:
            if chunk.start == 0:
                self.prefill_masks.append(None)  # plain causal
            else:
                q_pos = torch.arange(chunk.start, chunk.end, device=device)
                self.prefill_masks.append(torch.arange(chunk.end, device=device)[None, :] <= q_pos[:, None])

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        keys, values = self.kv.keys[layer], self.kv.values[layer]
        keys[meta.write_rows, :, meta.write_positions] = k
        values[meta.write_rows, :, meta.write_positions] = v
        out = torch.empty((q.shape[0], self.num_heads * self.head_dim), dtype=q.dtype, device=q.device)
        n = meta.num_decode_rows
        if n:
            self._decode(q[:n], keys, values, out[:n])
        for chunk, mask in zip(meta.prefills, self.prefill_masks, strict=True):
            self._prefill(q, keys, values, out, chunk, mask)
        return out

    def _decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
        n, kvh, group, dim = q.shape[0], self.kv.kv_heads, self.group, self.head_dim
        self._attend(q.reshape(n, kvh, group, dim), keys[:n], values[:n], self.dense_len, self.decode_bias,
                     out.view(n, kvh, group, dim))
        for row in self.long_rows:  # longer than dense_len: recompute on its own length
            bias = self.long_row_bias[row]
            self._attend(q[row: row + 1].reshape(1, kvh, group, dim), keys[row: row + 1], values[row: row + 1],
                         bias.shape[-1], bias, out[row: row + 1].view(1, kvh, group, dim))

    def _attend(self, q, keys, values, length: int, bias, out) -> None:
        """``q (rows, kv_heads, group, dim)`` against the first ``length`` keys of each row."""
        # Scores are computed transposed, K @ q^T -> (keys, group): the cache view is then read in its
        # own row-major layout (q^T K would make the matmul copy K first).
        rows, kvh, group, dim = q.shape
        k = keys[:, :, :length].reshape(rows * kvh, length, dim)
        v = values[:, :, :length].reshape(rows * kvh, length, dim)
        scores = torch.bmm(k, q.reshape(rows * kvh, group, dim).transpose(1, 2))
        scores = scores.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        scores = scores.mul_(self.scale).view(rows, kvh, group, length)
        if bias is not None:
            scores += bias
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(rows * kvh, group, length)
        torch.bmm(probs, v, out=out.view(rows * kvh, group, dim))

    def _prefill(self, q, keys, values, out, chunk, mask) -> None:
        rows = slice(chunk.token_offset, chunk.token_offset + chunk.num_tokens)
        qc = q[rows].transpose(0, 1).unsqueeze(0)  # (1, heads, tokens, dim)
        kc = keys[chunk.row, :, : chunk.end].unsqueeze(0)
        vc = values[chunk.row, :, : chunk.end].unsqueeze(0)
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                           enable_gqa=True)
        out[rows] = o[0].transpose(0, 1).reshape(chunk.num_tokens, -1)
