"""Fixed-shape decode steps: the preallocated KV cache, batch and length buckets, CUDA graphs.

How this works. In ``decode_mode: static`` (the default on CUDA) the model runner allocates the KV
cache once at start (``plan_kv``): ``rows`` full sequences of ``capacity = max_seq_len`` positions,
``rows = min(max_running_seqs, budget // capacity)`` where the budget is ``kv_budget_tokens`` and, on
CUDA, also the GPU memory free after the weights loaded times ``gpu_memory_fraction`` (read with
``torch.cuda.mem_get_info``). The scheduler admits at most ``rows`` sequences, so admission and the
cache agree. The cache never moves, so its addresses can be baked into CUDA graphs.

A decode-only step with ``n`` rows runs at a batch bucket ``B >= n`` (the configured
``cuda_graph_batch_sizes``, capped at ``rows``) and a read-length bucket ``L`` (powers of two from
``LENGTH_BUCKET_MIN`` up to the capacity) covering its longest row: the step's token ids, positions
and lengths go into static input buffers (padding rows: token 0 at position 0, length 1), the model
runs over ``B`` rows and attention reads keys ``0..L-1`` of rows ``0..B-1`` with a mask built on the
device from the lengths buffer (nothing in the forward depends on a Python-side length). Padding
rows write their key and value into rows ``n..B-1``, which are free: a decode-only step means no row
is still reading its prompt (``ScheduledBatch.num_running`` is checked), and a row's positions are
written before they are read once it is admitted. Logits of the first ``n`` rows are sampled outside.

On CUDA each ``(B, L)`` pair is captured once at start as a ``torch.cuda.CUDAGraph`` (one warm-up run
on a side stream first, all graphs in one memory pool, largest first) and replayed per step: a step
costs one host-to-device copy of the inputs and one graph launch instead of hundreds of kernel
launches. On CPU (``decode_mode: static``, for tests) the same fixed-shape forward runs eagerly.
Steps that read prompt chunks always run eagerly through the regular attention backend
(``engines/attention/torch_sdpa.py``, whose prefill is ``scaled_dot_product_attention``: flash or
memory-efficient kernels on CUDA).
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import asdict, dataclass

import torch

from .attention.torch_sdpa import TorchAttention
from .kv_cache import KVCache
from .protocol import EngineError

logger = logging.getLogger(__name__)

LENGTH_BUCKET_MIN = 256


class KVCacheTooSmallError(EngineError):
    """Not even one sequence of ``max_seq_len`` positions fits the KV budget."""


@dataclass(frozen=True)
class KVPlan:
    rows: int
    capacity: int
    bytes_per_token: int
    budget_tokens: int  # min(kv_budget_tokens, memory-derived tokens)
    kv_budget_tokens: int
    memory_tokens: int | None  # free GPU memory x fraction / bytes per token (None on CPU)
    free_bytes: int | None
    total_bytes: int | None
    gpu_memory_fraction: float

    @property
    def bytes(self) -> int:
        return self.rows * self.capacity * self.bytes_per_token

    def as_dict(self) -> dict:
        return {**asdict(self), "kv_gb": round(self.bytes / 2**30, 3)}


def plan_kv(capacity: int, bytes_per_token: int, max_running_seqs: int, kv_budget_tokens: int,
            device: torch.device, gpu_memory_fraction: float) -> KVPlan:
    """How many full sequences the preallocated cache holds (see the module docstring)."""
    free = total = memory_tokens = None
    budget = kv_budget_tokens
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        memory_tokens = int(free * gpu_memory_fraction) // bytes_per_token
        budget = min(budget, memory_tokens)
    rows = min(max_running_seqs, budget // capacity)
    if rows < 1:
        where = (f"{gpu_memory_fraction:g} of the {free / 2**30:.2f} GiB of GPU memory free after the weights "
                 f"({memory_tokens} tokens at {bytes_per_token} bytes each)" if free is not None
                 else f"kv_budget_tokens ({kv_budget_tokens})")
        raise KVCacheTooSmallError(
            f"the KV cache cannot hold one sequence of max_seq_len={capacity} tokens: {where}; lower max_seq_len, "
            "raise gpu_memory_fraction or kv_budget_tokens, or use a GPU with more free memory")
    return KVPlan(rows, capacity, bytes_per_token, budget, kv_budget_tokens, memory_tokens, free, total,
                  gpu_memory_fraction)


def batch_buckets(configured: tuple[int, ...], rows: int) -> tuple[int, ...]:
    """The configured decode batch sizes below ``rows``, plus ``rows`` itself when a larger one was asked for."""
    if not configured:
        return ()
    kept = [b for b in sorted(configured) if b < rows]
    if max(configured) >= rows:
        kept.append(rows)
    return tuple(kept)


def length_buckets(capacity: int, smallest: int = LENGTH_BUCKET_MIN) -> tuple[int, ...]:
    out, length = [], smallest
    while length < capacity:
        out.append(length)
        length *= 2
    return (*out, capacity)


def pick(buckets: tuple[int, ...], n: int) -> int | None:
    """The smallest bucket >= n (None when n exceeds them all)."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class StaticDecodeAttention(TorchAttention):
    """Decode attention of ``B`` rows over their first ``L`` cache positions, masked by lengths on the device."""

    def bind(self, rows: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, read_len: int) -> None:
        self.rows, self.positions, self.read = rows, positions, read_len
        keys = torch.arange(read_len, device=lengths.device)
        bias = torch.zeros((rows.shape[0], 1, 1, read_len), dtype=torch.float32, device=lengths.device)
        self.bias = bias.masked_fill_((keys[None, :] >= lengths[:, None])[:, None, None, :], float("-inf"))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.kv.keys[layer], self.kv.values[layer]
        keys[self.rows, :, self.positions] = k
        values[self.rows, :, self.positions] = v
        n, kvh, group, dim = q.shape[0], self.kv.kv_heads, self.group, self.head_dim
        out = torch.empty((n, self.num_heads * dim), dtype=q.dtype, device=q.device)
        self._attend(q.reshape(n, kvh, group, dim), keys[:n], values[:n], self.read, self.bias,
                     out.view(n, kvh, group, dim))
        return out


class StaticDecoder:
    """Static input buffers, the fixed-shape decode forward, and (on CUDA) its captured graphs."""

    def __init__(self, model, kv: KVCache, num_heads: int, head_dim: int, batch_sizes: tuple[int, ...]):
        self.model = model
        self.kv = kv
        self.device = kv.device
        self.batch_sizes = batch_sizes
        self.length_sizes = length_buckets(kv.capacity)
        self.max_batch = batch_sizes[-1]
        if self.max_batch > kv.rows:
            raise ValueError(f"decode bucket {self.max_batch} exceeds the KV cache's {kv.rows} rows")
        self.inputs = torch.zeros((3, self.max_batch), dtype=torch.long, device=self.device)  # ids, positions, lengths
        self.row_ids = torch.arange(self.max_batch, device=self.device)
        self.staging = torch.zeros(3 * self.max_batch, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.attention = StaticDecodeAttention(kv, num_heads, head_dim)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.steps: dict[tuple[int, int], int] = {}  # decode steps run per (batch, read length) bucket

    def _forward(self, batch: int, read_len: int) -> torch.Tensor:
        ids, positions, lengths = self.inputs[0, :batch], self.inputs[1, :batch], self.inputs[2, :batch]
        rows = self.row_ids[:batch]
        self.attention.bind(rows, positions, lengths, read_len)
        return self.model.forward(ids, positions, self.attention, rows)

    def buckets_for(self, n: int, longest: int) -> tuple[int, int] | None:
        batch = pick(self.batch_sizes, n)
        return None if batch is None else (batch, pick(self.length_sizes, longest))

    def _load_inputs(self, ids: list[int], positions: list[int], batch: int) -> None:
        pad = batch - len(ids)
        host = torch.tensor([ids + [0] * pad, positions + [0] * pad, [p + 1 for p in positions] + [1] * pad],
                            dtype=torch.long)
        if self.device.type == "cuda":
            # The previous step's copy is done: sampling synchronized on its logits.
            staged = self.staging[: 3 * batch].view(3, batch)  # contiguous pinned memory: a real async copy
            staged.copy_(host)
            self.inputs[:, :batch].copy_(staged, non_blocking=True)
        else:
            self.inputs[:, :batch].copy_(host)

    @torch.inference_mode()
    def run(self, ids: list[int], positions: list[int]) -> torch.Tensor:
        """Logits ``(n, vocab)`` of one decode step of ``n = len(ids)`` rows (rows ``0..n-1``)."""
        n = len(ids)
        batch, read_len = self.buckets_for(n, max(positions) + 1)
        self._load_inputs(ids, positions, batch)
        self.steps[(batch, read_len)] = self.steps.get((batch, read_len), 0) + 1
        captured = self.graphs.get((batch, read_len))
        if captured is None:
            return self._forward(batch, read_len)[:n]
        graph, logits = captured
        graph.replay()
        return logits[:n]

    # -- CUDA graphs ---------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> dict:
        """Capture every (batch, read length) bucket; returns timings. Call before any sequence runs
        (warm-up and capture write KV at position 0 of rows ``0..B-1``)."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        started = time.perf_counter()
        self.inputs.zero_()
        self.inputs[2].fill_(1)
        pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(self.device)
        for batch in reversed(self.batch_sizes):  # largest first: the smaller ones reuse its pool memory
            for read_len in reversed(self.length_sizes):
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._forward(batch, read_len)  # lazy inits (cuBLAS handles, workspaces) outside the capture
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    logits = self._forward(batch, read_len)
                self.graphs[(batch, read_len)] = (graph, logits)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        return {"graphs": len(self.graphs), "capture_s": round(self.capture_seconds, 3),
                "batch_sizes": list(self.batch_sizes), "length_buckets": list(self.length_sizes)}

    @torch.inference_mode()
    def validate(self, vocab_size: int, repeats: int = 5) -> dict:
        """Replay each graph against the same forward run eagerly on the same inputs; returns per-bucket
        max |logit difference| and replay time. Overwrites KV contents (call at build time, not serving)."""
        generator = torch.Generator().manual_seed(0)
        report = {}
        for (batch, read_len), (graph, logits) in sorted(self.graphs.items()):
            ids = torch.randint(0, vocab_size, (batch,), generator=generator).tolist()
            positions = torch.randint(0, read_len, (batch,), generator=generator).tolist()
            self._load_inputs(ids, positions, batch)
            eager = self._forward(batch, read_len).clone()
            graph.replay()
            torch.cuda.synchronize(self.device)
            diff = float((logits - eager).abs().max())
            same_argmax = bool(torch.equal(logits.argmax(-1), eager.argmax(-1)))
            started = time.perf_counter()
            for _ in range(repeats):
                graph.replay()
            torch.cuda.synchronize(self.device)
            report[f"{batch}x{read_len}"] = {"max_abs_diff": diff, "max_abs_logit": float(eager.abs().max()),
                                             "same_argmax": same_argmax,
                                             "replay_ms": round((time.perf_counter() - started) / repeats * 1e3, 3)}
        self.inputs.zero_()
        self.inputs[2].fill_(1)
        return report
