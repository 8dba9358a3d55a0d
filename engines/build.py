"""Build an engine artifact once, so replicas start in seconds.

    python -m engines.build                       # the default model (SmolLM2-135M-Instruct GGUF)
    python -m engines.build --source model.gguf --out artifacts/my-model
    python -m engines.build --source HuggingFaceTB/SmolLM2-360M-Instruct --out artifacts/smollm2-360m
    python -m engines.build --device cuda         # also prepare it for the GPU of this machine
    python -m engines.build --engine trtllm       # + a TensorRT-LLM engine saved into the artifact (GPU)

An up-to-date artifact (same source hash and dtype) is left alone unless ``--force`` is given.

How this works with ``--device cuda``. After the (CPU) conversion, the artifact is loaded on the GPU
as a replica would load it (``--gpu-dtype``, default bf16 where supported), its KV cache sized from the
free GPU memory (``--gpu-memory-fraction``, ``--max-seq-len``, ``--max-running-seqs``,
``--kv-budget-tokens``), and every decode bucket (``--cuda-graph-batch-sizes`` x the read-length
buckets) captured as a CUDA graph, replayed against the same forward run eagerly (the build fails if one
picks another token or differs beyond rounding) and timed. ``manifest.json`` then records, under ``gpu``:
the buckets asked for (a replica caps them to its own rows), those captured here, the GPU's fingerprint (name,
compute capability, driver, CUDA runtime, torch; ``engines/gpu.py``), the dtype, the validated
buckets, the KV sizing and the capture figures. A replica on CUDA refuses the artifact if its GPU
differs, and otherwise uses the recorded buckets. CUDA graphs themselves belong to one process and
cannot be saved: a replica still captures at start (seconds, timed here as ``capture_s``); what the
artifact carries is the checked plan, not the graphs. Without CUDA, ``--device cuda`` exits with
status 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .artifacts import DEFAULT_ARTIFACT_DIR, MANIFEST, artifact_is_current, build_artifact, default_gguf_path
from .config import DEFAULT_CUDA_GRAPH_BATCH_SIZES, EngineConfig

NO_GPU_MESSAGE = ("--device cuda needs an NVIDIA GPU, and torch sees none (torch.cuda.is_available() is False); "
                  "run it on the GPU machine that will serve, or build for CPU without --device")


def prepare_gpu(out: Path, config: EngineConfig) -> dict:
    """Load the artifact on CUDA, size the KV cache, capture and validate every decode bucket; record
    the result as ``manifest["gpu"]`` and return it."""
    import torch

    from .artifacts import resolve_model
    from .device import resolve_dtype
    from .gpu import gpu_fingerprint
    from .model_runner import ModelRunner

    device = torch.device("cuda")
    dtype = resolve_dtype(config.dtype, device)
    started = time.perf_counter()
    runner = ModelRunner(resolve_model(str(out)), dtype, device, config.max_running_seqs,
                         config.resolve_max_seq_len(None))
    load_s = time.perf_counter() - started
    with torch.inference_mode():
        plan = runner.setup_static(config.max_running_seqs, config.kv_budget_tokens, config.gpu_memory_fraction,
                                   config.cuda_graph_batch_sizes, capture=True)
        validation = runner.static.validate(runner.spec.vocab_size) if runner.static is not None else {}
    # Relative to the logits' size: one bf16 rounding step at |logit| 8 is already 0.06.
    relative = 1e-4 if dtype == "float32" else 2 ** -6
    bad = {k: v for k, v in validation.items()
           if not v["max_abs_diff"] <= relative * max(1.0, v["max_abs_logit"]) or not v["same_argmax"]}
    if bad:
        raise RuntimeError(f"CUDA graph replay differs from the eager forward (beyond {relative:g} x the largest "
                           f"logit, or another argmax): {bad}")
    section = {
        "fingerprint": gpu_fingerprint(device),
        "dtype": dtype,
        # What was asked for: a replica caps it to its own rows (a bigger replica keeps its big buckets).
        "cuda_graph_batch_sizes": list(config.cuda_graph_batch_sizes),
        "captured_batch_sizes": list(runner.static.batch_sizes) if runner.static else [],
        "length_buckets": list(runner.static.length_sizes) if runner.static else [],
        "max_seq_len": runner.max_seq_len,
        "kv": plan.as_dict(),
        "capture": runner.graph_report,
        "validation": validation,
        "load_s": round(load_s, 3),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
        "build_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    runner.release()
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["gpu"] = section
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.build", description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="GGUF file, Hugging Face model directory or hub id (default: SmolLM2-135M GGUF)")
    parser.add_argument("--out", type=Path, help=f"artifact directory (default: {DEFAULT_ARTIFACT_DIR})")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--force", action="store_true", help="rebuild even when the artifact is current")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="prompt + output per sequence, for --device cuda and --engine trtllm "
                        "(default: the model's context length)")
    gpu = parser.add_argument_group("GPU preparation (--device cuda)")
    gpu.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                     help="cuda: also prepare the artifact for this machine's GPU (see the module docstring)")
    gpu.add_argument("--gpu-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gpu.add_argument("--max-running-seqs", type=int, default=EngineConfig.max_running_seqs)
    gpu.add_argument("--kv-budget-tokens", type=int, default=EngineConfig.kv_budget_tokens)
    gpu.add_argument("--gpu-memory-fraction", type=float, default=EngineConfig.gpu_memory_fraction)
    gpu.add_argument("--cuda-graph-batch-sizes", default=",".join(map(str, DEFAULT_CUDA_GRAPH_BATCH_SIZES)),
                     help="comma-separated; empty: none")
    add_trtllm_arguments(parser)
    args = parser.parse_args(argv)
    if args.engine == "trtllm" and args.device == "cuda":
        print("error: --engine trtllm builds its own GPU engine; run --device cuda (the torch engine's GPU "
              "preparation) as a separate build", file=sys.stderr)
        return 2

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"error: {NO_GPU_MESSAGE}", file=sys.stderr)
            return 2
    if args.engine == "trtllm":
        return build_trtllm(args, args.out or DEFAULT_ARTIFACT_DIR)
    source = args.source or str(default_gguf_path())
    out = args.out or DEFAULT_ARTIFACT_DIR
    if not args.force and artifact_is_current(out, source, args.dtype):
        print(f"artifact up to date: {out}")
    else:
        print(f"building artifact {out} from {source} ...", flush=True)
        manifest = build_artifact(source, out, args.dtype)
        print(json.dumps(manifest, indent=2))
    if args.device == "cuda":
        sizes = tuple(int(x) for x in args.cuda_graph_batch_sizes.split(",") if x.strip())
        config = EngineConfig(model=str(out), device="cuda", dtype=args.gpu_dtype, max_seq_len=args.max_seq_len,
                              max_running_seqs=args.max_running_seqs, kv_budget_tokens=args.kv_budget_tokens,
                              gpu_memory_fraction=args.gpu_memory_fraction, cuda_graph_batch_sizes=sizes)
        print(f"preparing {out} for this GPU ...", flush=True)
        print(json.dumps({"gpu": prepare_gpu(out, config)}, indent=2))
    return 0


def add_trtllm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TensorRT-LLM (--engine trtllm)")
    group.add_argument("--engine", default="torch", choices=["torch", "trtllm"],
                       help="torch: the artifact only (default); trtllm: also build a TensorRT-LLM engine into it")
    group.add_argument("--trtllm-dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                       help="TensorRT engine precision (default bfloat16)")
    group.add_argument("--max-batch-size", type=int, default=EngineConfig.max_running_seqs,
                       help="engine max_batch_size: serve it with max_running_seqs no larger")
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
