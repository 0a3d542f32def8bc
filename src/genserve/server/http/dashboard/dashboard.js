// genserve dashboard: polls the server's own JSON endpoints and draws the charts with uPlot.
// Every asset is served by genserve itself (/dashboard, /static), so it works offline.
"use strict";

const REFRESH_MS = 2000;
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
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Math.abs(v) !== 0 && Math.abs(v) < 0.001) return v.toExponential(2);
  return Number(v).toFixed(digits === undefined ? 3 : digits);
}

// A value axis's tick labels: one unit for the whole axis, so small values read as 25µ or 1.5m
// rather than 2.50e-5 (which did not fit the axis and showed cut, as ".50e-5"); digits by the step.
function tickLabels(self, splits, _i, _space, incr) {
  const top = Math.max(0, ...splits.map(Math.abs));
  const [unit, suffix] = top === 0 || top >= 0.01 ? [1, ""]
    : top >= 1e-3 ? [1e-3, "m"] : top >= 1e-6 ? [1e-6, "µ"] : [1e-9, "n"];
  const step = incr / unit;
  const digits = step >= 1 ? 0 : Math.min(6, Math.ceil(-Math.log10(step) - 1e-9));
  return splits.map(v => v === 0 ? "0" : (v / unit).toFixed(digits) + suffix);
}

// The axis as wide as its longest label (uPlot's own autosize recipe): labels are never cut.
function axisSize(self, values, axisIdx, cycleNum) {
  const axis = self.axes[axisIdx];
  if (cycleNum > 1) return axis._size;
  const longest = (values || []).reduce((a, v) => (v.length > a.length ? v : a), "");
  self.ctx.font = axis.font[0];
  return Math.ceil(axis.ticks.size + axis.gap + self.ctx.measureText(longest).width / devicePixelRatio) + 2;
}

function fmtS(v) { return v === null || v === undefined ? "–" : fmt(v, v < 10 ? 3 : 1) + "s"; }

// One time-series chart per figure, drawn by uPlot (vendored under /static/uplot: time axis,
// gridlines, a legend with the values under the cursor). series = [{name, values: [v|null, ...]}]
// over the shared timestamps ``ts`` (unix seconds); nulls break the line. The figure carries
// data-points (non-null points) and data-max (largest value) so tests can read the data back.
// A time tick as the local wall clock: 14:05, or 14:05:30 when ticks are less than a minute apart.
function clock(t, incr) {
  const opts = incr < 60 ? {hour: "2-digit", minute: "2-digit", second: "2-digit"} : {hour: "2-digit", minute: "2-digit"};
  return new Date(t * 1000).toLocaleTimeString([], {...opts, hour12: false});
}

const plots = window.genservePlots = {};  // exposed for tests: the uPlot instances by figure id

function drawChart(fig, ts, series) {
  const vals = series.flatMap(s => s.values.filter(v => v !== null && v !== undefined));
  fig.dataset.points = String(vals.length);
  fig.dataset.max = String(vals.length ? Math.max(...vals) : 0);
  const data = [ts, ...series.map(s => s.values)];
  const width = Math.max(280, fig.clientWidth - 16);
  let u = plots[fig.id];
  if (u && u.series.length === series.length + 1) {
    if (Math.abs(u.width - width) > 4) u.setSize({width, height: u.height});
    u.setData(data);
    return;
  }
  if (u) u.destroy();
  fig.replaceChildren(el("figcaption", {}, fig.dataset.title));
  u = plots[fig.id] = new uPlot({
    width, height: 170,
    scales: {x: {time: true}, y: {range: (self, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1]}},
    series: [{label: "time"}, ...series.map((s, i) => ({
      label: s.name, stroke: COLORS[i % COLORS.length], width: 1.6, spanGaps: false,
      points: {show: true, size: 4}, value: (self, v) => fmt(v),
    }))],
    axes: [{grid: {stroke: "#e6e8ef"}, space: 45, values: (self, ticks, _i, _space, incr) => ticks.map(t => clock(t, incr))}, {size: axisSize, grid: {stroke: "#e6e8ef"}, values: tickLabels}],
    cursor: {points: {show: true}},
    legend: {live: true},
  }, data, fig);
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

// Thumbnails of finished jobs. With API keys on, an <img src> cannot send the Bearer token, so each
// thumbnail is fetched with it and shown from a blob: URL: once per job (kept across refreshes, which
// rebuild the rows), only when its row scrolls into view (lazy), and released when the job leaves
// the list. A failed fetch is not retried while the job stays listed. The <img> carries data-state:
// pending | loaded | failed (tests read it).
const thumbs = new Map();  // job id -> {url: blob URL or null, failed: bool, promise}
const thumbObserver = new IntersectionObserver(entries => {
  for (const e of entries) {
    if (!e.isIntersecting) continue;
    thumbObserver.unobserve(e.target);
    loadThumb(e.target);
  }
}, {rootMargin: "200px"});

async function getBlobURL(url) {
  // From this page's origin, like the other calls: the job view's URLs carry the server's public
  // base, which may name another host than the one this page was opened on (a cross-origin fetch).
  const u = new URL(url, location.href), path = u.pathname + u.search;
  const headers = KEY ? {Authorization: `Bearer ${KEY}`} : {};
  const r = await fetch(path, {headers, signal: AbortSignal.timeout(FETCH_TIMEOUT_MS)});
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return URL.createObjectURL(await r.blob());
}

function showThumb(img, t) {
  if (t.url) { img.src = t.url; img.alt = img.title; img.dataset.state = "loaded"; }
  else if (t.failed) img.dataset.state = "failed";
}

function loadThumb(img) {
  const id = img.dataset.jobId;
  let t = thumbs.get(id);
  if (!t) {
    t = {url: null, failed: false};
    t.promise = getBlobURL(img.dataset.thumb).then(u => { t.url = u; }, () => { t.failed = true; });
    thumbs.set(id, t);
  }
  t.promise.then(() => showThumb(img, t));
}

function thumbCell(j) {
  const td = el("td", {class: "thumb"});
  const res = (j.results || [])[0];
  if (!res || !res.thumbnail_url) { td.textContent = "–"; return td; }
  const img = el("img", {alt: "", title: `${j.model}: ${j.params.prompt || ""}`,
                         "data-job-id": j.id, "data-thumb": res.thumbnail_url, "data-state": "pending"});
  td.append(img);
  const t = thumbs.get(j.id);
  if (t && (t.url || t.failed)) showThumb(img, t);
  else thumbObserver.observe(img);
  return td;
}

function forgetThumbs(listed) {
  for (const [id, t] of thumbs) {
    if (listed.has(id)) continue;
    thumbs.delete(id);
    t.promise.then(() => { if (t.url) URL.revokeObjectURL(t.url); });
  }
}

async function refresh() {
  const sel = document.getElementById("window");
  const win = sel.value, step = sel.selectedOptions[0].dataset.step;
  const [series, stats, workers, jobs] = await Promise.all([
    getJSON(`/v1/stats/series?window=${win}&step=${step}`), getJSON(`/v1/stats?window=${win}`),
    getJSON("/v1/workers"), getJSON("/v1/jobs?limit=25"),
  ]);
  const ts = series.points.map(p => p.t);
  for (const [id, fields] of Object.entries(CHARTS)) {
    drawChart(document.getElementById(id), ts,
              fields.map(([f, name]) => ({name, values: series.points.map(p => p[f])})));
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
  thumbObserver.disconnect();  // the rows are rebuilt: observe the new <img>s only
  forgetThumbs(new Set(jobs.data.map(j => j.id)));
  fillTable("jobs", jobs.data.map(j => {
    const tr = el("tr", {"data-job-id": j.id});
    const bd = el("td");
    bd.append(breakdownBar(j.breakdown));
    tr.append(thumbCell(j), cell(j.id.slice(0, 10)), cell(j.model), cell(j.status, `status-${j.status}`),
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
