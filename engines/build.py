"""Build an engine artifact once, so replicas start in seconds.

    python -m engines.build                       # the default model (SmolLM2-135M-Instruct GGUF)
    python -m engines.build --source model.gguf --out artifacts/my-model
    python -m engines.build --source HuggingFaceTB/SmolLM2-360M-Instruct --out artifacts/smollm2-360m

An up-to-date artifact (same source hash and dtype) is left alone unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .artifacts import DEFAULT_ARTIFACT_DIR, artifact_is_current, build_artifact, default_gguf_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.build", description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="GGUF file, Hugging Face model directory or hub id (default: SmolLM2-135M GGUF)")
    parser.add_argument("--out", type=Path, help=f"artifact directory (default: {DEFAULT_ARTIFACT_DIR})")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--force", action="store_true", help="rebuild even when the artifact is current")
    args = parser.parse_args(argv)

    source = args.source or str(default_gguf_path())
    out = args.out or DEFAULT_ARTIFACT_DIR
    if not args.force and artifact_is_current(out, source, args.dtype):
        print(f"artifact up to date: {out}")
        return 0
    print(f"building artifact {out} from {source} ...", flush=True)
    manifest = build_artifact(source, out, args.dtype)
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
