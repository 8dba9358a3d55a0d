"""Device and dtype choices: ``device: auto`` and ``dtype: auto``.

``dtype: auto`` is bfloat16 where the hardware computes it natively — CUDA, and CPUs with AVX512-BF16
or AMX (oneDNN then runs bf16 matmuls at several times the float32 rate and reads half the bytes) —
and float32 elsewhere, where bf16 would be emulated and slower than float32.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from .gpu import NoGpuError

        raise NoGpuError(f"device {name!r} needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    return device


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch: read the flags ourselves
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> str:
    """The dtype name ``name`` stands for on ``device`` (``auto`` resolved; others unchanged)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"
