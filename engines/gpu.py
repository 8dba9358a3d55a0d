"""Which GPU an artifact was prepared on, and the refusal to run it on another.

How this works. ``gpu_fingerprint()`` describes the GPU a process sees: device name, compute
capability, driver version (from NVML through ``pynvml`` when installed, else ``nvidia-smi``), the CUDA
runtime torch was built with and the torch version. ``python -m engines.build --device cuda`` records
it in the artifact's ``manifest.json`` (``manifest["gpu"]["fingerprint"]``) beside what it prepared
(decode batch buckets, KV sizing, capture timings). A replica starting on CUDA from such an artifact
calls :func:`check_gpu_artifact`: any difference in those fields raises :class:`GpuArtifactMismatchError`
naming what the artifact was built for, what is present and the command that rebuilds it — it never
goes on with shapes and timings validated elsewhere. An artifact without a ``gpu`` section (built for
CPU) is accepted on any GPU: everything is then captured at start.
"""

from __future__ import annotations

import shutil
import subprocess

from .protocol import EngineError

FINGERPRINT_FIELDS = ("name", "compute_capability", "driver", "cuda_runtime", "torch")


class GpuArtifactMismatchError(EngineError):
    """The artifact's GPU section was prepared on another GPU, driver, CUDA runtime or torch."""


class NoGpuError(EngineError):
    """CUDA was asked for where torch sees no NVIDIA GPU."""


def driver_version() -> str | None:
    """The NVIDIA driver version, via NVML (``pynvml``) or ``nvidia-smi``; None if neither answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - not installed, no driver, no permission: try the next way
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


def gpu_fingerprint(device=None) -> dict:
    """What identifies the GPU and software stack this process runs on (``NoGpuError`` without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        raise NoGpuError("needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    index = torch.device(device or "cuda").index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "name": torch.cuda.get_device_name(index),
        "compute_capability": f"{major}.{minor}",
        "driver": driver_version(),
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "total_memory_gb": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
    }


def describe(fingerprint: dict) -> str:
    return (f"{fingerprint.get('name')} (compute capability {fingerprint.get('compute_capability')}, "
            f"driver {fingerprint.get('driver')}, CUDA {fingerprint.get('cuda_runtime')}, "
            f"torch {fingerprint.get('torch')})")


def rebuild_command(artifact_dir: str, source: str | None) -> str:
    from .artifacts import DEFAULT_ARTIFACT_DIR

    if artifact_dir and str(DEFAULT_ARTIFACT_DIR) == str(artifact_dir):
        return "python -m engines.build --device cuda"
    src = f" --source {source}" if source else ""
    return f"python -m engines.build --device cuda{src} --out {artifact_dir}"


def check_gpu_artifact(gpu_section: dict, present: dict, artifact_dir: str, source: str | None = None) -> None:
    """Raise :class:`GpuArtifactMismatchError` unless ``gpu_section`` was built for the ``present`` GPU."""
    refuse_other_gpu(gpu_section.get("fingerprint") or {}, present, f"artifact {artifact_dir} was prepared",
                     rebuild_command(artifact_dir, source))


def refuse_other_gpu(built: dict, present: dict, subject: str, rebuild: str) -> None:
    """Raise :class:`GpuArtifactMismatchError` when ``built`` and ``present`` differ in any fingerprint field."""
    differ = [f for f in FINGERPRINT_FIELDS if built.get(f) != present.get(f)]
    if differ:
        raise GpuArtifactMismatchError(
            f"{subject} for {describe(built)}, but this replica has {describe(present)} "
            f"(differs in: {', '.join(differ)}); refusing to serve with a GPU preparation made elsewhere. "
            f"Rebuild it here: {rebuild}")
