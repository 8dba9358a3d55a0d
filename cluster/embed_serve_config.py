"""Copy each serve config into its RayService manifest's ``serveConfigV2`` (so there is one source):
serve_config.yaml -> cluster/kuberay/rayservice.yaml, serve_config.gpu.yaml -> rayservice.gpu.yaml.

    python cluster/embed_serve_config.py          # rewrite the manifests
    python cluster/embed_serve_config.py --check  # exit 1 if a manifest is out of date
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
PAIRS = [(ROOT / "serve_config.yaml", KUBERAY / "rayservice.yaml"),
         (ROOT / "serve_config.gpu.yaml", KUBERAY / "rayservice.gpu.yaml")]
BEGIN = "  serveConfigV2: |\n"
END = "  # -- end of serveConfigV2 (generated from {} by cluster/embed_serve_config.py) --\n"


def embedded(manifest_text: str, serve_config_text: str, source_name: str) -> str:
    """The manifest with the block between BEGIN and END replaced by the serve config, indented."""
    end = END.format(source_name)
    head, rest = manifest_text.split(BEGIN, 1)
    _, tail = rest.split(end, 1)
    block = "".join(f"    {line}" if line.strip() else "\n" for line in serve_config_text.splitlines(keepends=True))
    return head + BEGIN + block + end + tail


def main() -> int:
    stale = []
    for serve_config, manifest in PAIRS:
        current = manifest.read_text()
        wanted = embedded(current, serve_config.read_text(), serve_config.name)
        if current == wanted:
            continue
        if "--check" in sys.argv:
            stale.append(manifest)
        else:
            manifest.write_text(wanted)
    for manifest in stale:
        print(f"{manifest} is out of date: run python cluster/embed_serve_config.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
