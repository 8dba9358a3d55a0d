"""Copy serve_config.yaml into the RayService manifest's ``serveConfigV2`` (so there is one source).

    python cluster/embed_serve_config.py          # rewrite cluster/kuberay/rayservice.yaml
    python cluster/embed_serve_config.py --check  # exit 1 if the manifest is out of date
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve_config.yaml"
MANIFEST = ROOT / "cluster" / "kuberay" / "rayservice.yaml"
BEGIN = "  serveConfigV2: |\n"
END = "  # -- end of serveConfigV2 (generated from serve_config.yaml by cluster/embed_serve_config.py) --\n"


def embedded(manifest_text: str, serve_config_text: str) -> str:
    """The manifest with the block between BEGIN and END replaced by the serve config, indented."""
    head, rest = manifest_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    block = "".join(f"    {line}" if line.strip() else "\n" for line in serve_config_text.splitlines(keepends=True))
    return head + BEGIN + block + END + tail


def main() -> int:
    current = MANIFEST.read_text()
    wanted = embedded(current, SERVE_CONFIG.read_text())
    if "--check" in sys.argv:
        if current != wanted:
            print(f"{MANIFEST} is out of date: run python cluster/embed_serve_config.py", file=sys.stderr)
            return 1
        return 0
    MANIFEST.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
