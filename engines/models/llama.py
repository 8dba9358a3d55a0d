"""Llama-family decoder (Llama, Qwen2, Qwen3) in plain torch, for the engine's flat token batches.

How this works. Weights come from the artifact's safetensors, converted once at load: q/k/v fused
into one ``qkv`` matrix and gate/up into one ``gate_up`` matrix (one matmul each instead of three and
two), cast to the serving dtype. The RoPE cos/sin tables are computed once for every position (with
transformers' own RoPE initializers, so scaled variants match the reference). A forward takes the
step's tokens flattened into one ``(T,)`` batch with their positions — decode tokens and prefill
chunks together, no padding — and runs every matmul once over all ``T`` tokens; attention is the
backend's (``engines/attention``), which also writes the KV cache. Only the rows that need a next
token go through the final norm and the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ModelSpec, rope_parameters


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN prepacking pays for bf16/fp16 on CPU (measured: a batch-1 step's matmuls 18.9 -> 9.2 ms)."""
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and _LINEAR_POINTWISE is not None)


# The overload itself, not the packet: skips overload resolution in Python on every call (measured:
# torch.ops' packet dispatch was visible in a py-spy profile of the engine thread).
_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None


class Linear:
    """``y = x W^T + b``. With ``prepack`` the weight is reordered once into oneDNN's blocked layout,
    so no matmul re-reads it in the row-major layout (same results, bit for bit)."""

    __slots__ = ("weight", "bias", "packed", "numel")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool):
        self.numel = weight.numel()
        self.bias = bias
        self.packed = prepack
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if prepack else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return _LINEAR_POINTWISE(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Layer:
    __slots__ = ("input_norm", "qkv", "q_norm", "k_norm", "o_proj", "post_norm", "gate_up", "down")


def rope_tables(config, spec: ModelSpec, max_positions: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """cos and sin ``(max_positions, head_dim)`` as transformers computes them (float32, then cast)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = rope_parameters(config)
    kind = rope.get("rope_type", "default")
    if kind == "default":
        base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float) / spec.head_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
    freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype=dtype, device=device), (emb.sin() * scaling).to(dtype=dtype, device=device)


class LlamaModel:
    def __init__(self, spec: ModelSpec, config, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device, max_positions: int):
        self.spec = spec
        self.dtype = dtype
        self.device = device

        def take(name: str) -> torch.Tensor:
            return tensors.pop(name).to(device=device, dtype=dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in tensors else None

        self.prepacked = can_prepack(dtype, device)
        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight")
        lm_head = tensors.pop("lm_head.weight", None)
        lm_head = self.embed if (spec.tie_word_embeddings or lm_head is None) else lm_head.to(device, dtype)
        self.lm_head = Linear(lm_head, None, self.prepacked)
        self.layers: list[Layer] = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            layer = Layer()
            layer.input_norm = take(p + "input_layernorm.weight")
            layer.post_norm = take(p + "post_attention_layernorm.weight")
            biases = [maybe(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            layer.qkv = Linear(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
                               torch.cat(biases) if all(b is not None for b in biases) else None, self.prepacked)
            layer.q_norm = maybe(p + "self_attn.q_norm.weight")
            layer.k_norm = maybe(p + "self_attn.k_norm.weight")
            layer.o_proj = Linear(take(p + "self_attn.o_proj.weight"), maybe(p + "self_attn.o_proj.bias"), self.prepacked)
            layer.gate_up = Linear(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]), None,
                                   self.prepacked)
            layer.down = Linear(take(p + "mlp.down_proj.weight"), None, self.prepacked)
            if spec.qk_norm and (layer.q_norm is None or layer.k_norm is None):
                raise ValueError(f"{spec.architecture} checkpoint lacks q_norm/k_norm weights in layer {i}")
            self.layers.append(layer)
        self.cos, self.sin = rope_tables(config, spec, max_positions, dtype, device)

    def matmul_parameters(self) -> int:
        """Weights every forward reads once: the matrices of all layers and the LM head."""
        per_layer = sum(m.numel for layer in self.layers for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
        return per_layer + self.lm_head.numel

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.spec.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention, sample_rows: torch.Tensor) -> torch.Tensor:
        """``input_ids``/``positions``: ``(T,)``. Returns float32 logits ``(len(sample_rows), vocab)``."""
        spec = self.spec
        tokens = input_ids.shape[0]
        heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        half = dim // 2
        x = F.embedding(input_ids, self.embed)
        for index, layer in enumerate(self.layers):
            h = self.rms_norm(x, layer.input_norm)
            qkv = layer.qkv(h)
            qk = qkv[:, : spec.q_size + spec.kv_size].view(tokens, heads + kv_heads, dim)
            v = qkv[:, spec.q_size + spec.kv_size:].view(tokens, kv_heads, dim)
            if layer.q_norm is not None:
                qk = torch.cat([self.rms_norm(qk[:, :heads], layer.q_norm), self.rms_norm(qk[:, heads:], layer.k_norm)], 1)
            rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + rotated * sin
            o = attention.forward(index, qk[:, :heads], qk[:, heads:], v)
            x = x + layer.o_proj(o)
            h = self.rms_norm(x, layer.post_norm)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        if sample_rows.numel() == 0:
            return torch.empty((0, spec.vocab_size), dtype=torch.float32, device=x.device)
        last = self.rms_norm(x[sample_rows], self.norm)
        return self.lm_head(last).float()
