"""The model runner: weights, KV cache and attention backend of one replica; one forward per step.

How this works. ``run(batch)`` turns a :class:`ScheduledBatch` into flat tensors — token ids,
positions, each token's cache row and position, the rows that need a next token — runs the model once
over all of them (decodes and prompt chunks together) and samples one token for every sequence that
needs one. Weights are loaded from the artifact's safetensors (a GGUF file or hub id goes through
transformers first, slowly); the model classes are ``engines/models``; attention and KV writes are the
backend's (``engines/attention``).

With ``setup_static`` (``decode_mode: static``, the default on CUDA) the KV cache is allocated once
and decode-only steps go through :class:`engines.static_decode.StaticDecoder` — fixed shapes, CUDA
graphs on a GPU; steps with prompt chunks still take the flat path above.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .artifacts import LoadTarget
from .attention import AttentionMetadata, PrefillChunk, create_attention_backend
from .device import DTYPES
from .kv_cache import KVCache
from .models import ModelSpec, model_spec
from .models.llama import LlamaModel
from .sampling import sample_next_tokens
from .scheduler import ScheduledBatch
from .static_decode import KVPlan, StaticDecoder, batch_buckets, plan_kv

logger = logging.getLogger(__name__)


def load_checkpoint(target: LoadTarget, dtype: torch.dtype) -> tuple[object, dict[str, torch.Tensor]]:
    """``(transformers config, state dict in dtype)`` of a load target. Safetensors are read one
    tensor at a time and cast at once, so a float32 artifact served in bf16 never sits whole in memory."""
    from transformers import AutoConfig

    path = Path(target.path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files and target.gguf_file is None:
        from safetensors import safe_open

        config = AutoConfig.from_pretrained(path)
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            with safe_open(f, framework="pt") as reader:
                names = list(reader.keys())
            for i in range(0, len(names), 32):  # reopened now and then: mapped pages leave RSS when closed
                with safe_open(f, framework="pt") as reader:
                    for name in names[i: i + 32]:
                        tensors[name] = reader.get_tensor(name).to(dtype)
        return config, tensors
    from transformers import AutoModelForCausalLM

    logger.warning("loading %s through transformers (no safetensors artifact): build one with python -m engines.build",
                   target.path)
    model = AutoModelForCausalLM.from_pretrained(target.path, gguf_file=target.gguf_file, dtype=torch.float32)
    return model.config, {name: t.to(dtype) for name, t in model.state_dict().items()}


class ModelRunner:
    def __init__(self, target: LoadTarget, dtype: str, device: torch.device, max_rows: int, max_seq_len: int,
                 attention: str = "torch"):
        self.device = device
        self.dtype = DTYPES[dtype]
        self.hf_config, tensors = load_checkpoint(target, self.dtype)
        self.spec: ModelSpec = model_spec(self.hf_config)
        self.max_seq_len = min(max_seq_len, self.spec.max_positions)  # the context the model was trained for
        self.model = LlamaModel(self.spec, self.hf_config, tensors, self.dtype, device, self.max_seq_len)
        self.kv = KVCache(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, self.dtype, device,
                          max_rows, self.max_seq_len)
        self.attention = create_attention_backend(attention, self.kv, self.spec.num_heads, self.spec.head_dim)
        self.banned_if_ignore_eos: torch.Tensor | None = None  # set by the engine once the tokenizer is known
        self.static: StaticDecoder | None = None
        self.kv_plan: KVPlan | None = None
        self.graph_report: dict | None = None

    def setup_static(self, max_running_seqs: int, kv_budget_tokens: int, gpu_memory_fraction: float,
                     batch_sizes: tuple[int, ...], capture: bool) -> KVPlan:
        """Preallocate the KV cache for good and prepare fixed-shape decode (``capture``: CUDA graphs)."""
        plan = plan_kv(self.max_seq_len, self.kv.bytes_per_token, max_running_seqs, kv_budget_tokens, self.device,
                       gpu_memory_fraction)
        self.kv.allocate_fixed(plan.rows, plan.capacity)
        self.kv_plan = plan
        buckets = batch_buckets(batch_sizes, plan.rows)
        self.static = StaticDecoder(self.model, self.kv, self.spec.num_heads, self.spec.head_dim, buckets) \
            if buckets else None
        if capture and self.static is not None:
            self.graph_report = self.static.capture()
        free = f", {plan.free_bytes / 2**30:.2f} GiB GPU memory free after weights x {gpu_memory_fraction:g}" \
            if plan.free_bytes is not None else ""
        logger.info("static KV cache: %d rows x %d positions = %d tokens, %.3f GiB (budget %d tokens: kv_budget_tokens "
                    "%d%s); decode buckets %s; %s", plan.rows, plan.capacity, plan.rows * plan.capacity,
                    plan.bytes / 2**30, plan.budget_tokens, kv_budget_tokens, free, list(buckets) or "none (eager)",
                    f"{self.graph_report['graphs']} CUDA graphs captured in {self.graph_report['capture_s']:.2f}s"
                    if self.graph_report else "no CUDA graphs")
        if plan.rows < max_running_seqs:
            logger.warning("the KV cache holds %d full sequences of max_seq_len=%d: max_running_seqs %d is lowered to "
                           "%d (raise kv_budget_tokens or gpu_memory_fraction, or lower max_seq_len)", plan.rows,
                           plan.capacity, max_running_seqs, plan.rows)
        return plan

    def release(self) -> None:
        self.static = None
        self.kv.release(force=True)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int]:
        """One forward over the batch; returns a token for each of ``batch.sampled``."""
        static = self.static
        if static is not None and not batch.prefill and batch.num_running == len(batch.decode) \
                and len(batch.decode) <= static.max_batch:
            logits = static.run([seq.last_token for seq in batch.decode], [seq.num_computed for seq in batch.decode])
            return sample_next_tokens(logits, batch.sampled, self.banned_if_ignore_eos)
        ids: list[int] = [seq.last_token for seq in batch.decode]
        positions: list[int] = [seq.num_computed for seq in batch.decode]
        rows: list[int] = list(range(len(batch.decode)))
        sample_rows: list[int] = list(range(len(batch.decode)))
        chunks = []
        for seq, take in batch.prefill:
            start = seq.num_computed
            chunks.append(PrefillChunk(seq.row, start, take, len(ids)))
            ids += seq.prompt_ids[start: start + take]
            positions += range(start, start + take)
            rows += [seq.row] * take
            if start + take == len(seq.prompt_ids):
                sample_rows.append(len(ids) - 1)
        device = self.device
        write_positions = torch.tensor(positions, device=device)
        self.attention.prepare(AttentionMetadata(
            decode_lengths=tuple(p + 1 for p in positions[: len(batch.decode)]), prefills=tuple(chunks),
            write_rows=torch.tensor(rows, device=device), write_positions=write_positions))
        logits = self.model.forward(torch.tensor(ids, device=device), write_positions, self.attention,
                                    torch.tensor(sample_rows, dtype=torch.long, device=device))
        return sample_next_tokens(logits, batch.sampled, self.banned_if_ignore_eos) if sample_rows else []
