"""TensorRT-LLM backend: not implemented yet.

Selecting ``engine: trtllm`` fails at start with a clear message instead of silently falling back
to another backend. This module is only imported when that engine is chosen."""

from __future__ import annotations

from .config import EngineConfig
from .protocol import Engine, EngineError


class UnsupportedEngineError(EngineError, RuntimeError):
    pass


def create_trtllm_engine(config: EngineConfig) -> Engine:
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError as exc:
        raise UnsupportedEngineError(
            "engine 'trtllm' needs the tensorrt_llm package and an NVIDIA GPU; it is not installed here. "
            "Use engine 'torch' (works on CPU and GPU)."
        ) from exc
    raise UnsupportedEngineError(
        "engine 'trtllm' is not implemented in this release; use engine 'torch'. "
        "Prebuilt TensorRT-LLM engine artifacts are planned (see README, 'Engines')."
    )
