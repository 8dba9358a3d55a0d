// The ops page: polls /ops/state (served by the ingress from the ops collector, serve_app/ops.py)
// every 2 s and draws it. No library: figures, two SVG line charts, three tables.
"use strict";

const POLL_MS = 2000;
const $ = (sel) => document.querySelector(sel);

const fmt = {
  num: (v, digits = 0) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits)),
  ms: (s) => (s === null || s === undefined ? "–" : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`),
  pct: (r) => (r === null || r === undefined ? "–" : `${(r * 100).toFixed(1)}%`),
  time: (s) => new Date(s * 1000).toLocaleTimeString(),
  short: (id) => (id || "").slice(0, 8),
};

function setText(sel, text) { $(sel).textContent = text; }

function rows(tbody, items, cells) {
  const el = $(tbody);
  el.innerHTML = "";
  for (const item of items) {
    const tr = document.createElement("tr");
    for (const value of cells(item)) {
      const td = document.createElement("td");
      if (value instanceof Node) td.appendChild(value); else td.textContent = value;
      tr.appendChild(td);
    }
    el.appendChild(tr);
  }
}

function span(text, cls) {
  const el = document.createElement("span");
  el.textContent = text;
  el.className = cls;
  return el;
}

/** Line chart of one or more series (nulls are gaps) on a 600x120 viewBox, y from 0 to the max. */
function chart(svg, series, classes) {
  const W = 600, H = 120, PAD = 14;
  const all = series.flat().filter((v) => v !== null);
  const max = Math.max(...all, 1e-9);
  const n = Math.max(...series.map((s) => s.length));
  const x = (i) => (n <= 1 ? 0 : (i / (n - 1)) * W);
  const y = (v) => H - PAD - (v / max) * (H - 2 * PAD);
  let html = `<text x="2" y="10">${all.length ? max.toPrecision(3) : "no data yet"}</text>`;
  series.forEach((values, k) => {
    let points = [];
    const flush = () => {
      if (points.length > 1) html += `<polyline class="${classes[k] || ""}" points="${points.join(" ")}"/>`;
      if (points.length === 1) {
        const [cx, cy] = points[0].split(",");
        html += `<circle class="${classes[k] || ""}" cx="${cx}" cy="${cy}" r="3"/>`;
      }
      points = [];
    };
    values.forEach((v, i) => (v === null ? flush() : points.push(`${x(i).toFixed(1)},${y(v).toFixed(1)}`)));
    flush();
  });
  svg.innerHTML = html;
}

function describe(e) {
  switch (e.kind) {
    case "scaled": return `${e.deployment}: ${e.from_replicas} → ${e.to_replicas} running replicas (${e.trigger})`;
    case "status": return `${e.deployment}: ${e.from_status} → ${e.to_status} (${e.trigger}) ${e.message || ""}`;
    case "replica_up": return `${e.deployment} replica ${fmt.short(e.replica)} reporting from node ${fmt.short(e.node_id)}`;
    case "replica_gone": return `${e.deployment} replica ${fmt.short(e.replica)} on node ${fmt.short(e.node_id)} silent for ${e.silent_s} s: gone`;
    default: return JSON.stringify(e);
  }
}

function render(state) {
  const t = state.totals;
  const model = state.deployments.find((d) => d.name === "ModelServer");
  setText("#fig-replicas", model ? String(model.running_replicas) : String(t.model_replicas));
  setText("#fig-inflight", fmt.num(t.requests_in_flight));
  setText("#fig-inflight-sub", `${t.requests_running} running · ${t.requests_waiting} waiting`);
  setText("#fig-tokens", fmt.num(t.tokens_per_s, 1));
  setText("#fig-ttft-p50", fmt.ms(t.ttft_p50_s));
  setText("#fig-ttft-p95", fmt.ms(t.ttft_p95_s));
  setText("#fig-ttft-sub", `${t.ttft_samples} requests, last ${Math.round(state.window_s / 60)} min`);
  setText("#fig-cache-hit", fmt.pct(t.prefix_cache_hit_rate));
  setText("#fig-cache-sub", `${t.prefix_cache_lookups} lookups, last ${Math.round(state.window_s / 60)} min`);
  chart($("#chart-tokens"), [state.series.tokens_per_s], [""]);
  chart($("#chart-ttft"), [state.series.ttft_p50_s, state.series.ttft_p95_s], ["", "p95"]);
  rows("#deployments tbody", state.deployments, (d) => [
    d.name, span(d.status, `status-${d.status}`), d.running_replicas,
    Object.entries(d.replica_states).map(([k, v]) => `${k}: ${v}`).join(", "), d.message,
  ]);
  rows("#replicas tbody", state.model_replicas, (r) => [
    r.replica, fmt.short(r.node_id), r.running, r.waiting, r.last_batch_size, fmt.pct(r.kv_occupancy),
    `${fmt.pct(r.prefix_cache_occupancy)} full, ${fmt.pct(r.prefix_cache_hit_rate)} hits`, r.tokens_generated,
    `${r.report_age_s.toFixed(1)} s`,
  ]);
  const events = $("#events");
  events.innerHTML = "";
  for (const e of state.events) {
    const li = document.createElement("li");
    li.dataset.kind = e.kind;
    li.innerHTML = `<time></time><span></span>`;
    li.querySelector("time").textContent = fmt.time(e.at_s);
    li.querySelector("span").textContent = describe(e);
    events.appendChild(li);
  }
  if (!state.events.length) events.innerHTML = "<li>none yet</li>";
  const updated = $("#updated");
  updated.textContent = `updated ${fmt.time(state.at_s)}`;
  updated.classList.remove("stale");
}

async function poll() {
  try {
    const response = await fetch("/ops/state", { headers: Auth.headers() });
    if (response.status === 401 || response.status === 403) Auth.refused(response.status);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (err) {
    const updated = $("#updated");
    updated.textContent = `update failed (${err.message}); retrying`;
    updated.classList.add("stale");
  }
  setTimeout(poll, POLL_MS);
}

poll();
