"""The run's outputs in ``--out DIR``: ``<name>.json`` (everything), ``<name>.md`` (summary tables) and
PNG plots: ``<name>.png`` puts load, latency percentiles, throughput and Serve's replicas and queues on
one time axis; a multi-turn run adds ``<name>_ttft_by_turn.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MODEL_DEPLOYMENT = "ModelServer"


def write_outputs(report: dict, out_dir: str, name: str) -> list[str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report))
    plot_timeline(report, paths[2])
    if report.get("multiturn"):
        paths.append(out / f"{name}_ttft_by_turn.png")
        plot_ttft_by_turn(report["multiturn"], paths[-1])
    return [str(p) for p in paths]


# -- markdown ---------------------------------------------------------------------------------------

def _ms(dist: dict | None, key: str) -> str:
    return "–" if not dist else f"{dist[key] * 1000:.0f}"


def _num(value, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def summary_row(label: str, s: dict, goodput: bool) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "0"
    cells = [label, str(s["completed"]), errors, _num(s["request_throughput_rps"], "{:.2f}"),
             _num(s["output_throughput_tok_s"]), _ms(s["ttft_s"], "p50"), _ms(s["ttft_s"], "p95"),
             _ms(s["tpot_s"], "p50"), _ms(s["tpot_s"], "p95"), _ms(s["itl_s"], "p50"), _ms(s["itl_s"], "p95"),
             _num(s["e2e_s"] and s["e2e_s"]["p50"], "{:.2f}"), _num(s["e2e_s"] and s["e2e_s"]["p95"], "{:.2f}")]
    if goodput:
        cells.append(f"{_num(s['goodput_rps'], '{:.2f}')} ({_num(s['slo_attainment'] and s['slo_attainment'] * 100, '{:.0f}')}%)"
                     if "goodput_rps" in s else "–")
    return "| " + " | ".join(cells) + " |"


def summary_table(rows: list[tuple[str, dict]], slo: dict) -> list[str]:
    head = ["phase", "ok", "errors", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p95 ms", "TPOT p50 ms",
            "TPOT p95 ms", "ITL p50 ms", "ITL p95 ms", "E2E p50 s", "E2E p95 s"]
    if slo:
        head.append("goodput req/s (SLO met)")
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [summary_row(label, s, bool(slo)) for label, s in rows]


def markdown(report: dict) -> str:
    target = report["target"]
    lines = [f"# {report['name']}: `{report['profile']}` profile", "",
             f"Target: {target['url']} (model `{target['model']}`"
             + (f", launched from `{target['launched_config']}`" if target.get("launched_config") else "") + ").",
             f"Settings: {json.dumps(report['settings'])}."]
    if report["slo"]:
        lines.append(f"SLO: {', '.join(f'{k} ≤ {v:g}' for k, v in report['slo'].items())}.")
    lines += ["", "## Summary", ""]
    rows = []
    for phase in report["phases"]:
        rows.append((phase["label"], phase["summary"]))
        rows += [(f"↳ {stage['label']}", stage["summary"]) for stage in phase.get("stages", [])]
    lines += summary_table(rows, report["slo"])
    examples = {(p["label"], kind): text for p in report["phases"]
                for kind, text in p["summary"].get("error_examples", {}).items()}
    if examples:
        lines += ["", "Errors (first of each kind):", ""]
        lines += [f"- {label}, `{kind}`: {text or '(no detail)'}" for (label, kind), text in examples.items()]
    serve = report.get("serve_status") or {}
    lines += ["", "## Serve replicas", ""]
    if serve.get("samples"):
        counts = [s["replicas"].get(MODEL_DEPLOYMENT, {}).get("RUNNING", 0) for s in serve["samples"]]
        lines.append(f"{MODEL_DEPLOYMENT} running replicas over the run: min {min(counts)}, max {max(counts)} "
                     f"({len(counts)} samples every {serve['interval_s']} s from Serve's REST API).")
    else:
        lines.append(f"Not sampled: {serve.get('note') or 'no Ray dashboard given'}.")
    if report.get("multiturn"):
        lines += ["", "## Multi-turn: TTFT by turn", ""] + multiturn_table(report["multiturn"])
    lines += ["", "## Machine", "", f"`{json.dumps(report['machine'])}`", ""]
    return "\n".join(lines)


def multiturn_table(mt: dict) -> list[str]:
    modes = list(mt["ttft_by_turn_s"])
    head = ["turn", "history tokens p50", "old turns dropped"] + [f"TTFT p50 ms ({m})" for m in modes] + \
        [f"cached share ({m})" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dropped = mt.get("history_turns_dropped_by_turn") or [None] * len(mt["history_tokens_by_turn"])
    for i, history in enumerate(mt["history_tokens_by_turn"]):
        cells = [str(i + 1), _num(history, "{:.0f}"), _num(dropped[i], "{:d}")]
        cells += [_num(mt["ttft_by_turn_s"][m][i] and mt["ttft_by_turn_s"][m][i] * 1000, "{:.0f}") for m in modes]
        cells += [_num(mt["hit_rate"][m]["cached_share_by_turn"][i], "{:.2f}") for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for m in modes:
        h = mt["hit_rate"][m]
        replicas = (mt.get("replicas_per_conversation") or {}).get(m)
        lines.append(f"- {m}: {_num(h['cached_token_share'], '{:.1%}')} of prompt tokens served from cache; "
                     f"{_num(h['turns_with_hit_share'], '{:.1%}')} of turns had a cache hit; "
                     f"{_num(replicas, '{:.2f}')} model replicas per conversation.")
    return lines


# -- plots ------------------------------------------------------------------------------------------

def plot_timeline(report: dict, path: Path) -> None:
    """Load, latency, throughput and replicas on one shared time axis."""
    ts = report["time_series"]
    t = ts["t_s"]
    serve = report.get("serve_status") or {}
    samples = serve.get("samples") or []
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    load, latency, throughput, replicas = axes

    load.step(t, ts["in_flight"], where="mid", color="black", label="requests in flight (client)")
    load.set_ylabel("in flight")
    for phase in report["phases"]:
        for part in [phase, *phase.get("stages", [])[1:]]:
            for ax in axes:
                ax.axvline(part["start_s"], color="grey", lw=0.6, ls=":")
            load.annotate(part["label"], (part["start_s"], 1), xycoords=("data", "axes fraction"), fontsize=7,
                          va="top", rotation=90)
    load.legend(loc="upper right", fontsize=8)

    for key, style, label in (("ttft_p50_s", "-", "TTFT p50"), ("ttft_p95_s", "--", "TTFT p95"),
                              ("tpot_p50_s", "-", "TPOT p50"), ("tpot_p95_s", "--", "TPOT p95")):
        values = [None if v is None else v * 1000 for v in ts[key]]
        latency.plot(t, values, ls=style, marker=".", label=label,
                     color="tab:blue" if key.startswith("ttft") else "tab:orange")
    latency.set_ylabel("ms")
    latency.set_yscale("log")
    latency.legend(loc="upper right", fontsize=8, ncol=2)

    throughput.plot(t, ts["output_tok_s"], color="tab:green", label="output tokens/s")
    throughput.set_ylabel("tokens/s")
    throughput.legend(loc="upper left", fontsize=8)
    rps = throughput.twinx()
    rps.plot(t, ts["completed_rps"], color="tab:purple", ls=":", label="completed req/s")
    rps.set_ylabel("req/s")
    rps.legend(loc="upper right", fontsize=8)

    if samples:
        st = [s["t_s"] for s in samples]
        for deployment in sorted({d for s in samples for d in s["replicas"]}):
            running = [s["replicas"].get(deployment, {}).get("RUNNING", 0) for s in samples]
            replicas.step(st, running, where="post", lw=2 if deployment == MODEL_DEPLOYMENT else 1,
                          label=f"{deployment} running")
        targets = [s["target_replicas"].get(MODEL_DEPLOYMENT) for s in samples]
        replicas.step(st, targets, where="post", ls="--", color="grey", label=f"{MODEL_DEPLOYMENT} target")
        replicas.set_ylabel("replicas")
        replicas.yaxis.set_major_locator(MaxNLocator(integer=True))
        top = max([max(s["replicas"].get(d, {}).get("RUNNING", 0) for d in s["replicas"]) for s in samples] + [1])
        replicas.set_ylim(0, top + 0.5)
        replicas.legend(loc="upper left", fontsize=8)
        queue_lines = {key: [s["metrics"].get(key, {}).get(MODEL_DEPLOYMENT) for s in samples]
                       for key in ("ongoing", "queued")}
        if any(v is not None for values in queue_lines.values() for v in values):
            queue = replicas.twinx()
            for (key, values), style in zip(queue_lines.items(), ("-", ":"), strict=True):
                queue.plot(st, values, ls=style, color="tab:red", alpha=0.7, label=f"{MODEL_DEPLOYMENT} {key}")
            queue.set_ylabel("requests (Serve metrics)")
            queue.legend(loc="upper right", fontsize=8)
    else:
        replicas.text(0.5, 0.5, "no Serve samples: " + (serve.get("note") or "target is not a Ray Serve app"),
                      transform=replicas.transAxes, ha="center", va="center", fontsize=8, wrap=True)
    replicas.set_xlabel("seconds since start")
    fig.suptitle(f"{report['name']} ({report['profile']}) against {report['target']['url']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ttft_by_turn(mt: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    turns = list(range(1, len(mt["history_tokens_by_turn"]) + 1))
    for mode, values in mt["ttft_by_turn_s"].items():
        ax.plot(turns, [None if v is None else v * 1000 for v in values], marker="o", label=f"TTFT p50, {mode}")
    ax.set_xlabel("turn")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("TTFT p50 (ms)")
    ax.legend(loc="upper left")
    history = ax.twinx()
    history.bar(turns, [h or 0 for h in mt["history_tokens_by_turn"]], alpha=0.15, color="grey",
                label="prompt (history) tokens")
    history.set_ylabel("prompt tokens")
    history.legend(loc="lower right")
    ax.set_zorder(history.get_zorder() + 1)
    ax.patch.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
