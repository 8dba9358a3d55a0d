#!/usr/bin/env bash
# Produce the committed results in benchmarks/results/ (JSON, markdown, PNG). Run it on a quiet machine:
# nothing else busy on the CPU, since every figure is a wall-clock measurement. About 15 minutes.
#
#   bash benchmarks/run_all.sh                        # all runs
#   ONLY="step multiturn" bash benchmarks/run_all.sh  # some of them
#
# Each run of our app launches it fresh from $CONFIG on a private Ray cluster (--launch) and tears it down.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-serve_config.yaml}
OUT=${OUT:-benchmarks/results}
SLO=${SLO:-ttft_ms=2000,tpot_ms=250}   # goodput: first token within 2 s, then >= 4 tokens/s per stream
ONLY=${ONLY:-"steady step multiturn responses baseline"}
bench() { "$PY" -m benchmarks serve --out "$OUT" --slo "$SLO" "$@"; }
wanted() { [[ " $ONLY " == *" $1 "* ]]; }

# Steady closed-loop load, 30 s per level (autoscaling as configured: 32 streams may bring a 2nd replica).
# Replicas are sampled every 5 s here (1 s in the step run): on 2 cores the dashboard's work per sample
# costs the model replica measurable time.
wanted steady && bench --launch "$CONFIG" --sample-interval-s 5 --profile concurrency --concurrency 1,8,32 \
    --duration-s 30 --max-tokens 64 --name steady

# The autoscaling picture: 1 stream, then 32 for 90 s (above target_ongoing_requests=24 -> 2 replicas after
# upscale_delay_s), then 1 again for 80 s (downscale after downscale_delay_s=30). ~3.5 min of load.
wanted step && bench --launch "$CONFIG" --profile step --stages 1:20,32:90,1:80 --max-tokens 64 --name step

# Multi-turn: 4 conversations x 8 turns of ~90-token messages and 96-token replies (turn 8 sees ~1500
# history tokens, within context_budget_tokens), prefix-KV reuse on, then off (cache_prompt=false).
wanted multiturn && bench --launch "$CONFIG" --sample-interval-s 5 --profile multiturn --turns 8 --conversations 4 --user-tokens 90 \
    --max-tokens 96 --think-time-s 1 --name multiturn
# The same with one conversation: the cost of the history alone, without other conversations' steps.
wanted multiturn && bench --launch "$CONFIG" --sample-interval-s 5 --profile multiturn --turns 8 --conversations 1 \
    --user-tokens 90 --max-tokens 96 --think-time-s 1 --name multiturn_single

# The same single conversation through OpenAI's Responses API: each turn names the previous response
# (previous_response_id), the server keeps the history and the append-only prompt hits the prefix cache.
wanted responses && bench --launch "$CONFIG" --sample-interval-s 5 --profile multiturn --api responses --turns 8 \
    --conversations 1 --user-tokens 90 --max-tokens 96 --think-time-s 1 --name multiturn_responses

# The baseline (one transformers generate per request, no batching) at 1 and 8 streams, side by side.
if wanted baseline; then
    PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PY" -m benchmarks baseline-server --port "$PORT" &
    BASELINE_PID=$!
    trap 'kill "$BASELINE_PID" 2>/dev/null || true' EXIT
    for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 1; done
    bench --url "http://127.0.0.1:$PORT" --profile concurrency --concurrency 1,8 --duration-s 30 --max-tokens 64 \
        --name baseline_steady
    kill "$BASELINE_PID"
fi

if [[ -f "$OUT/steady.json" && -f "$OUT/baseline_steady.json" ]]; then
    "$PY" -m benchmarks compare "$OUT/steady.json" "$OUT/baseline_steady.json" > "$OUT/side_by_side.md"
    cat "$OUT/side_by_side.md"
fi
