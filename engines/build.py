"""Build an engine artifact once, so replicas start in seconds.

    python -m engines.build                       # the default model (SmolLM2-135M-Instruct GGUF)
    python -m engines.build --source model.gguf --out artifacts/my-model
    python -m engines.build --source HuggingFaceTB/SmolLM2-360M-Instruct --out artifacts/smollm2-360m
    python -m engines.build --engine trtllm       # + a TensorRT-LLM engine saved into the artifact (GPU)

An up-to-date artifact (same source hash and dtype) is left alone unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .artifacts import DEFAULT_ARTIFACT_DIR, MANIFEST, artifact_is_current, build_artifact, default_gguf_path
from .config import EngineConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.build", description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="GGUF file, Hugging Face model directory or hub id (default: SmolLM2-135M GGUF)")
    parser.add_argument("--out", type=Path, help=f"artifact directory (default: {DEFAULT_ARTIFACT_DIR})")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--force", action="store_true", help="rebuild even when the artifact is current")
    add_trtllm_arguments(parser)
    args = parser.parse_args(argv)

    if args.engine == "trtllm":
        return build_trtllm(args, args.out or DEFAULT_ARTIFACT_DIR)
    source = args.source or str(default_gguf_path())
    out = args.out or DEFAULT_ARTIFACT_DIR
    if not args.force and artifact_is_current(out, source, args.dtype):
        print(f"artifact up to date: {out}")
        return 0
    print(f"building artifact {out} from {source} ...", flush=True)
    manifest = build_artifact(source, out, args.dtype)
    print(json.dumps(manifest, indent=2))
    return 0


def add_trtllm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TensorRT-LLM (--engine trtllm)")
    group.add_argument("--engine", default="torch", choices=["torch", "trtllm"],
                       help="torch: the artifact only (default); trtllm: also build a TensorRT-LLM engine into it")
    group.add_argument("--trtllm-dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                       help="TensorRT engine precision (default bfloat16)")
    group.add_argument("--max-batch-size", type=int, default=EngineConfig.max_running_seqs,
                       help="engine max_batch_size: serve it with max_running_seqs no larger")
    group.add_argument("--max-seq-len", type=int, default=None,
                       help="engine max_seq_len, prompt + output (default: the model's context length)")
    group.add_argument("--max-num-tokens", type=int, default=None, help="engine max_num_tokens per iteration")


def build_trtllm(args: argparse.Namespace, out: Path) -> int:
    """``--engine trtllm``: the HF-format artifact (built as usual when missing, or with ``--source``
    and ``--force`` when out of date), then the TensorRT-LLM engine built from it once and saved into
    it (``engines/trtllm.py``)."""
    from .trtllm import DEFAULT_MAX_NUM_TOKENS, build_trtllm_engine

    if not (out / MANIFEST).exists() or (args.force and args.source
                                          and not artifact_is_current(out, args.source, args.dtype)):
        source = args.source or str(default_gguf_path())
        print(f"building artifact {out} from {source} ...", flush=True)
        build_artifact(source, out, args.dtype)
    print(f"building TensorRT-LLM engine into {out} ...", flush=True)
    manifest = build_trtllm_engine(out, dtype=args.trtllm_dtype, max_batch_size=args.max_batch_size,
                                   max_seq_len=args.max_seq_len,
                                   max_num_tokens=args.max_num_tokens or DEFAULT_MAX_NUM_TOKENS, force=args.force)
    print(json.dumps(manifest["trtllm"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
