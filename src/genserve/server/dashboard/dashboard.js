// genserve dashboard: polls the server's own JSON endpoints and draws SVG charts by hand.
// No external assets, so it works offline. Each chart's <svg> carries data-points (non-empty
// points drawn) and data-max (largest value) so tests and curious people can read it back.
"use strict";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#3e7bfa", "#f0b429", "#d64545", "#2bb673"];

const CHARTS = {
  "chart-queue": [["queue_depth", "queued"]],
  "chart-latency": [["latency_p50_s", "P50"], ["latency_p95_s", "P95"], ["latency_p99_s", "P99"]],
  "chart-throughput": [["throughput_per_s", "jobs/s"]],
  "chart-utilization": [["utilization", "busy"]],
  "chart-cold": [["cold_starts", "cold starts"]],
  "chart-failures": [["failure_rate", "failed share"]],
  "chart-cost": [["cost_per_inference_usd", "$/inference"]],
};

function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Math.abs(v) !== 0 && Math.abs(v) < 0.001) return v.toExponential(2);
  return Number(v).toFixed(digits === undefined ? 3 : digits);
}

function fmtS(v) { return v === null || v === undefined ? "–" : fmt(v, v < 10 ? 3 : 1) + "s"; }

// One line chart: series = [{name, values: [[t, v|null], ...]}]. Null values break the line.
function drawChart(fig, series) {
  fig.replaceChildren(el("figcaption", {}, fig.dataset.title));
  const W = 320, H = 150, L = 38, R = 6, T = 8, B = 18;
  const svg = el("svg:svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none"});
  const all = series.flatMap(s => s.values.filter(p => p[1] !== null));
  const ts = series.flatMap(s => s.values.map(p => p[0]));
  const t0 = Math.min(...ts), t1 = Math.max(...ts);
  const vmax = all.length ? Math.max(...all.map(p => p[1])) : 0;
  const top = vmax > 0 ? vmax * 1.1 : 1;
  const x = t => L + (t1 > t0 ? (t - t0) / (t1 - t0) : 0.5) * (W - L - R);
  const y = v => H - B - (v / top) * (H - T - B);
  svg.append(el("svg:line", {class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B}),
             el("svg:line", {class: "axis", x1: L, y1: T, x2: L, y2: H - B}),
             el("svg:text", {x: 2, y: T + 8}, fmt(top, top < 10 ? 2 : 0)),
             el("svg:text", {x: 2, y: H - B}, "0"),
             el("svg:text", {x: L, y: H - 4}, ts.length ? `−${Math.round(t1 - t0)}s` : ""),
             el("svg:text", {x: W - R - 18, y: H - 4}, "now"));
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    let d = "", pen = "M";
    for (const [t, v] of s.values) {
      if (v === null) { pen = "M"; continue; }
      d += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)} `;
      pen = "L";
      svg.append(el("svg:circle", {class: "pt", cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 1.8, fill: color}));
    }
    if (d) svg.append(el("svg:path", {class: "line", d, stroke: color}));
  });
  svg.dataset.points = String(all.length);
  svg.dataset.max = String(vmax);
  fig.append(svg);
  const keys = el("div");
  series.forEach((s, i) => {
    const last = [...s.values].reverse().find(p => p[1] !== null);
    keys.append(el("span", {class: "key", style: `color:${COLORS[i % COLORS.length]}`},
                   `■ ${s.name} ${last ? fmt(last[1]) : "–"}`));
  });
  fig.append(keys);
}

function tile(label, value) {
  const d = el("div", {class: "tile"});
  d.append(el("b", {}, value), el("span", {}, label));
  return d;
}

function cell(text, cls) { return el("td", cls ? {class: cls} : {}, text); }

function fillTable(id, rows) {
  document.querySelector(`#${id} tbody`).replaceChildren(...rows);
}

function breakdownBar(b) {
  const total = b.total_s || 0;
  const bar = el("div", {class: "bar", title: JSON.stringify(b)});
  if (!total) return bar;
  const parts = [["queue", b.queue_wait_s], ["cold", b.cold_start_s], ["infer", b.inference_s], ["write", b.output_write_s]];
  let known = 0;
  for (const [cls, v] of parts) {
    if (!v) continue;
    known += v;
    bar.append(el("span", {class: `seg ${cls}`, style: `width:${(100 * v / total).toFixed(2)}%`}));
  }
  if (total > known) bar.append(el("span", {class: "seg other", style: `width:${(100 * (total - known) / total).toFixed(2)}%`}));
  return bar;
}

const FETCH_TIMEOUT_MS = 8000;  // a stalled request must not freeze the refresh loop

// With API keys on, open the dashboard as /dashboard#key=<admin key>: the fragment never reaches the
// server or its logs; the key is kept for this tab only and sent as a Bearer token.
const KEY = (() => {
  const m = location.hash.match(/key=([^&]+)/);
  if (m) { sessionStorage.setItem("genserve-key", decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
  return sessionStorage.getItem("genserve-key");
})();

async function getJSON(path) {
  const headers = KEY ? {Authorization: `Bearer ${KEY}`} : {};
  const r = await fetch(path, {cache: "no-store", headers, signal: AbortSignal.timeout(FETCH_TIMEOUT_MS)});
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

async function refresh() {
  const sel = document.getElementById("window");
  const win = sel.value, step = sel.selectedOptions[0].dataset.step;
  const [series, stats, workers, jobs] = await Promise.all([
    getJSON(`/v1/stats/series?window=${win}&step=${step}`), getJSON(`/v1/stats?window=${win}`),
    getJSON("/v1/workers"), getJSON("/v1/jobs?limit=25"),
  ]);
  for (const [id, fields] of Object.entries(CHARTS)) {
    drawChart(document.getElementById(id),
              fields.map(([f, name]) => ({name, values: series.points.map(p => [p.t, p[f]])})));
  }
  const o = stats.overall;
  document.getElementById("tiles").replaceChildren(
    tile("jobs done", String(o.count)), tile("throughput /s", fmt(o.throughput_per_s)),
    tile("P50", fmtS(o.latency_s.p50)), tile("P95", fmtS(o.latency_s.p95)), tile("P99", fmtS(o.latency_s.p99)),
    tile("P99.9", fmtS(o.latency_s["p99.9"])), tile("failure rate", fmt(o.failure_rate)),
    tile("utilization", fmt(o.utilization)), tile("cost / inference $", fmt(o.cost_per_inference_usd, 6)),
    tile("idle cost $", fmt(o.idle_cost_usd, 6)));
  fillTable("models", Object.entries(stats.models).map(([name, m]) => {
    const tr = el("tr");
    tr.append(cell(name), cell(String(m.queue_depth), "num"), cell(String(m.count), "num"),
              cell(fmtS(m.latency_s.p50), "num"), cell(fmtS(m.latency_s.p95), "num"), cell(fmtS(m.latency_s.p99), "num"),
              cell(fmtS(m.latency_s["p99.9"]), "num"), cell(fmt(m.failure_rate), "num"), cell(fmt(m.cold_start_rate), "num"),
              cell(fmt(m.mean_batch_size, 1), "num"), cell(fmt(m.utilization), "num"),
              cell(fmt(m.cost_per_inference_usd, 6), "num"), cell(fmt(m.idle_cost_usd, 6), "num"));
    return tr;
  }));
  // "demo-image (4.8 MB, warm pool)"; loading models are marked as such.
  const residentLabel = r => `${r.model} (${fmt((r.bytes || 0) / 1048576, 1)} MB${r.warm_pool ? ", warm pool" : ""}${r.loading ? ", loading" : ""})`;
  fillTable("workers", workers.data.map(w => {
    const tr = el("tr");
    tr.append(cell(w.id), cell(w.device), cell(w.state), cell((w.resident_models || []).map(residentLabel).join(", ") || "–"),
              cell(w.batch_id || "–"), cell(String(w.restarts), "num"));
    return tr;
  }));
  fillTable("jobs", jobs.data.map(j => {
    const tr = el("tr", {"data-job-id": j.id});
    const bd = el("td");
    bd.append(breakdownBar(j.breakdown));
    tr.append(cell(j.id.slice(0, 10)), cell(j.model), cell(j.status, `status-${j.status}`),
              cell(j.batch ? `${j.batch.size}` : "–", "num"), cell(j.batch ? j.batch.worker : "–"),
              cell(fmtS(j.breakdown.total_s), "num"), bd, cell(fmt(j.cost.device_seconds), "num"),
              cell(j.cost.usd === null ? "–" : "$" + fmt(j.cost.usd, 6), "num"));
    return tr;
  }));
  document.getElementById("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
}

async function loop() {
  let next = REFRESH_MS;
  try {
    await refresh();
  } catch (e) {
    document.getElementById("status").textContent = `error: ${e.message}`;
    next = Math.min(REFRESH_MS, 1000);  // a failed refresh is retried sooner
  }
  setTimeout(loop, next);
}

document.getElementById("window").addEventListener("change", () => refresh().catch(() => {}));
loop();
