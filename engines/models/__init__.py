"""Model families our runner implements, registered by Hugging Face architecture name.

``model_spec(config)`` reads a checkpoint's ``config.json`` into a :class:`ModelSpec` and refuses, with
an :class:`UnsupportedModelError` that says why, anything the runner would compute wrongly (another
architecture, sliding-window layers, an activation or RoPE variant it does not implement). There is no
silent fallback to another implementation: a model the runner cannot serve does not start.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol import EngineError

# Llama-family decoders: the same block (RMSNorm, GQA attention with RoPE, SwiGLU MLP). Qwen2 adds
# q/k/v biases (read from the checkpoint when present), Qwen3 adds per-head q/k RMSNorm.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(EngineError, ValueError):
    """The checkpoint is not a model our runner computes correctly."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_positions: int
    tie_word_embeddings: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def flops_per_token(self, context_len: int = 0) -> float:
        """Multiply-adds x2 of one token's forward: the weight matmuls plus attention over ``context_len``."""
        per_layer = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        per_layer += 3 * self.hidden_size * self.intermediate_size
        attention = 2 * self.num_heads * self.head_dim * context_len
        return 2.0 * (self.num_layers * (per_layer + attention) + self.hidden_size * self.vocab_size)


def model_spec(config) -> ModelSpec:
    """A :class:`ModelSpec` from a transformers config, or :class:`UnsupportedModelError`."""
    archs = list(getattr(config, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"model architecture {archs or config.model_type!r} is not supported by the torch engine's runner; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{arch} with hidden_act={act!r} is not supported (only silu)")
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(f"{arch} with sliding-window attention layers is not supported")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"RoPE type {rope.get('rope_type')!r} is not supported; "
                                    f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError(f"{arch} with mlp_bias=True is not supported")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelSpec(
        architecture=arch, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim=head_dim,
        vocab_size=config.vocab_size, rms_norm_eps=config.rms_norm_eps,
        max_positions=getattr(config, "max_position_embeddings", 1 << 20),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)), qk_norm=arch == "Qwen3ForCausalLM")


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)
