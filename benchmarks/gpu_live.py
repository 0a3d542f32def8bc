"""The live server at published model sizes, side by side with the bare pipeline (issue 26).

One command on a GPU machine (one H100 / H200): about 6 minutes expected, sections started only within a
440 s budget (the last one's tail and the shutdown fit in the rest of 8 minutes):

1. builds random-weight checkpoints with the published configurations (benchmarks/gpu_live_models.py):
   SDXL base 1.0 (fp16, served at 1024x1024) and Wan 2.1 T2V 1.3B (bf16, 832x480, 33 frames); with
   ``--flux`` also FLUX.1-schnell (bf16, 12B + a 4.7B T5: ~34 GB on disk, ~3 more minutes, so
   ``--budget-s 620``; off by default to keep the 8-minute call), built on the device and saved with
   ``save_pretrained``;
2. the bare pipeline in this process (the worker's loader and call arguments, nothing else): the
   batch curve, its best throughput (the limit), the allocator's peak per batch size;
3. a real ``genserve serve`` on the device (one worker per GPU) with a generated genserve.toml whose
   ``source`` keys point at the saved checkpoints, driven over HTTP by ``genserve bench``'s runner:
   overload (closed loop, 2 x the best batch in flight) vs the limit (target >= 0.95x); Poisson at
   70 % of the limit (P50 / P99, genserve's overhead = total - inference - output write, median);
   step vs request level with an 8/40-step mix (P99 time to first step, throughput) on SDXL when its
   family can be step-batched in this build, else on Wan at a small video shape (said in the report);
   the LoRA and speed levers when this build has them (probed from the config keys and /v1/loras);
   memory: the family estimate vs the device's peak per model and batch size, the weights as the
   worker measured them, a host-RAM reload vs the first (disk) load.

Each section has a time cap and runs only if the cap fits in what is left of ``--budget-s``; what
does not fit is skipped and named in the report. Writes one Markdown report (``--out``, default
benchmarks/results/gpu-live-<date>.md). Exit status 1 on a failed run (an error, a failed job),
never on a missed target.

    python benchmarks/gpu_live.py [--flux] [--out FILE] [--work DIR] [--budget-s 440]
    python benchmarks/gpu_live.py --dry-run     # the same code on the CPU: tiny configs, a few jobs,
                                                # a 2/6-step mix instead of 8/40
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import httpx  # noqa: E402
from gpu_live_bench import (GIB, Budget, Report, Shape, bare, bench, check_ok, ensure_loaded,  # noqa: E402
                            first_step, fmt, gib, load, model_table, overhead, records, server_table, unload,
                            workers)
from gpu_live_hooks import features, hook_sections, hook_tables  # noqa: E402
from gpu_live_models import build  # noqa: E402

from genserve.bench.live import LiveServer  # noqa: E402
from genserve.bench.workload import Arrival  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "gpu": {"sdxl": Shape("image", "1024x1024", 20, 5.0, 0, (1, 2, 4, 8), "float16"),
            "wan": Shape("video", "832x480", 10, 5.0, 33, (1, 2), "bfloat16"),
            "flux": Shape("image", "1024x1024", 4, None, 0, (1, 2, 4), "bfloat16", (("max_sequence_length", 256),))},
    "dry": {"sdxl": Shape("image", "64x64", 4, 5.0, 0, (1, 2, 4), "float32"),
            "wan": Shape("video", "32x32", 2, 5.0, 5, (1, 2), "float32"),
            "flux": Shape("image", "64x64", 2, None, 0, (1, 2), "float32", (("max_sequence_length", 256),))},
}
# step vs request: (size, frames, the cap of a batch / running set, jobs per phase) per model that may
# run it; on the GPU sized so that both modes' four phases fit the section's cap
STEP_SHAPES = {"gpu": {"sdxl": ("1024x1024", 0, 8, 6), "wan": ("480x272", 17, 4, 8)},
               "dry": {"sdxl": ("64x64", 0, 4, 4), "wan": ("32x32", 5, 4, 4)}}
STEP_MIX = {"gpu": (8, 40), "dry": (2, 6)}  # the dry run checks the code path, cheaply
CAPS = {  # seconds per section (per model where it says so); a section runs only if its cap fits
    "gpu": {"bare": {"sdxl": 50, "wan": 50, "flux": 50}, "server": 60, "overload": {"sdxl": 50, "wan": 50, "flux": 40},
            "poisson": {"sdxl": 60, "wan": 60, "flux": 40}, "step": 110, "memory": 25,
            # once issues 23 / 24 land: three bursts each, plus compiling at load; give --budget-s ~650 then
            "lora": 90, "speed": 150},
    "dry": {"bare": {"sdxl": 30, "wan": 30, "flux": 30}, "server": 120, "overload": {"sdxl": 20, "wan": 20, "flux": 20},
            "poisson": {"sdxl": 20, "wan": 20, "flux": 20}, "step": 60, "memory": 20, "lora": 30, "speed": 30},
}
MAX_JOBS = {"gpu": 16, "dry": 6}


@dataclass
class Ctx:
    mode: str  # gpu | dry
    device: str
    rep: Report
    budget: Budget
    models: list[str]
    paths: dict[str, Path] = field(default_factory=dict)
    bare: dict[str, dict[str, Any]] = field(default_factory=dict)
    loads: dict[str, dict[str, Any]] = field(default_factory=dict)
    feats: dict[str, Any] = field(default_factory=dict)
    step_model: str | None = None
    summary: list[str] = field(default_factory=list)  # the headline figures, repeated at the end
    url: str = ""
    client: httpx.Client | None = None

    def shape(self, m: str) -> Shape:
        return SHAPES[self.mode][m]

    def cap(self, section: str, m: str | None = None) -> float:
        c = CAPS[self.mode][section]
        return c[m] if m else c


def section(ctx: Ctx, title: str, cap: float, fn, *args) -> Any:
    """Run ``fn`` if ``cap`` fits in the budget; an exception is a failed run (reported, not raised)."""
    ctx.rep.say(f"\n## {title}\n")
    if not ctx.budget.fits(cap):
        ctx.rep.say(f"_Skipped: needs up to {cap:.0f} s, {max(0.0, ctx.budget.left()):.0f} s left of the budget._")
        return None
    t0 = time.monotonic()
    try:
        out = fn(ctx, *args)
    except Exception as e:  # noqa: BLE001 - every error is reported and fails the run
        ctx.rep.fail(f"{title}: {type(e).__name__}: {e}")
        ctx.rep.say("```\n" + traceback.format_exc()[-3000:] + "```")
        return None
    ctx.rep.say(f"_Section time {time.monotonic() - t0:.1f} s (cap {cap:.0f} s)._")
    return out


def environment(device: str) -> list[str]:
    import diffusers
    import torch
    import transformers

    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    driver = "–"
    if cuda:
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 check=False, capture_output=True, text=True, timeout=20)
            driver = smi.stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    mem = f"{torch.cuda.mem_get_info(device)[1] / GIB:.1f} GiB" if cuda else "–"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False,
                            capture_output=True, text=True).stdout.strip() or "–"
    return [f"- device: **{name}** (`{device}`), memory {mem}, driver {driver}",
            (f"- torch {torch.__version__} (CUDA {torch.version.cuda or '–'}), diffusers {diffusers.__version__}, "
             f"transformers {transformers.__version__}, python {platform.python_version()}"),
            f"- genserve commit {commit}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]


# ---- sections ------------------------------------------------------------------------------------

def s_build(ctx: Ctx, work: Path) -> None:
    scale = "published" if ctx.mode == "gpu" else "tiny"
    rows = []
    for m in list(ctx.models):
        sh = ctx.shape(m)
        need = {"sdxl": 8, "wan": 16, "flux": 36}[m] * GIB if ctx.mode == "gpu" else 0
        if shutil.disk_usage(work).free < need and not (work / m / "model_index.json").exists():
            ctx.rep.say(f"- {m}: skipped, {need / GIB:.0f} GiB of disk needed, "
                        f"{shutil.disk_usage(work).free / GIB:.0f} free")
            ctx.models.remove(m)
            continue
        info = build(m, work / m, scale, ctx.device, sh.dtype)
        ctx.paths[m] = work / m
        rows.append([m, scale, sh.dtype, params(info["params"]),
                     gib(info["disk_bytes"]), "reused" if info["reused"] else f"{info['seconds']:.1f}"])
    ctx.rep.say("Random weights, built on the device in the dtype shown, saved with `save_pretrained`.\n")
    ctx.rep.table(["model", "config", "dtype", "parameters", "on disk", "build + save s"], rows)


def params(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def s_bare(ctx: Ctx, m: str) -> None:
    sh = ctx.shape(m)
    reps = 1 if ctx.mode == "gpu" else 2
    r = bare(m, ctx.paths[m], sh, ctx.device, time.monotonic() + ctx.cap("bare", m) * 0.8, reps)
    ctx.bare[m] = r
    frames = f" x {sh.frames} frames" if sh.frames else ""
    ctx.rep.say(f"{m}: {sh.size}{frames}, {sh.steps} steps, guidance {fmt(sh.guidance, 1)}; per batch size the "
                f"fastest of {reps} call(s) after a 1-job warm-up; load from disk "
                f"{r['load_s']:.1f} s, weights {gib(r['weights_bytes'])} (allocator delta on CUDA, parameter "
                f"bytes on CPU); step-level driver in this build: {'yes' if r['step_capable'] else 'no'}\n")
    ctx.rep.table(["batch", "s / call", "jobs / s", "peak above the weights", "family estimate"],
                  [[c["batch"], c["seconds"], c["per_s"], gib(c["peak_bytes"]) if c["peak_bytes"] else "needs CUDA",
                    gib(c["estimate_bytes"])] for c in r["curve"]])
    if r["not_run"]:
        ctx.rep.say(f"Batch sizes {r['not_run']} not run: they would not have fit the section's cap.\n")
    ctx.rep.say(f"**Limit ({m}): {r['limit_per_s']:.3f} jobs/s at batch {r['best_batch']}.**")
    ctx.summary.append(f"bare {m}: {r['limit_per_s']:.3f} jobs/s at batch {r['best_batch']}")


def server_config(ctx: Ctx) -> str:
    out = server_table(48 if ctx.mode == "gpu" else 1) + "\n"
    for m in ctx.models:
        if m in ctx.bare:  # request level, at the bare pipeline's best batch; a window so a burst fills it
            out += model_table(m, ctx.paths[m], ctx.shape(m), max_batch=ctx.bare[m]["best_batch"], wait_ms=100) + "\n"
    sm = ctx.step_model
    if sm is not None:
        size, frames, cap, _ = STEP_SHAPES[ctx.mode][sm]
        for mode, wait in (("request", 50), ("step", 0)):
            out += model_table(f"{sm}-{mode}", ctx.paths[sm], ctx.shape(sm), max_batch=cap, wait_ms=wait,
                               batching=mode, size=size, frames=frames) + "\n"
    return out + hook_tables(ctx)


def s_server(ctx: Ctx, data: Path) -> LiveServer:
    srv = LiveServer(data, server_config(ctx), workers=1)
    t0 = time.monotonic()
    srv.start(timeout=ctx.cap("server"))
    ctx.url, ctx.client = srv.url, httpx.Client(base_url=srv.url, timeout=120)
    w = workers(ctx.client)["data"]
    desc = ", ".join(f"{x['id']} on {x['device']} ({x.get('device_name') or x.get('device_type')}, capacity "
                     f"{gib(x.get('capacity_bytes'))})" for x in w)
    ctx.rep.say(f"`genserve serve` ready in {time.monotonic() - t0:.1f} s: {len(w)} worker(s): {desc}. "
                f"Config (genserve.toml):\n\n```toml\n{srv.config_path.read_text()}```")
    return srv


def s_overload(ctx: Ctx, m: str) -> None:
    b, sh = ctx.bare[m], ctx.shape(m)
    cap = ctx.cap("overload", m)
    ld = ensure_loaded(ctx, m, cap)
    batches = max(2, min(4, int(0.5 * cap / b["best_seconds"])))
    n = min(MAX_JOBS[ctx.mode], batches * b["best_batch"])
    res = bench(ctx.url, m, sh, n, Arrival("closed", concurrency=2 * b["best_batch"]), timeout=2 * cap)
    for f in check_ok(res, f"overload {m}"):
        ctx.rep.fail(f)
    s = res["summary"]
    tp = s["throughput_per_s"] or 0.0
    ratio = tp / b["limit_per_s"]
    cold = ", its files dropped from the page cache first" if ctx.loads[m].get("page_cache_dropped") else ""
    ctx.rep.say(f"{m}: loaded through the API ({ld.get('tier')}, {fmt(ld.get('seconds'), 1)} s{cold}); {n} jobs, "
                f"closed loop with {2 * b['best_batch']} in flight, max batch {b['best_batch']}, 100 ms window.\n")
    ctx.rep.table(["model", "jobs ok", "genserve jobs/s", "bare limit jobs/s", "ratio", "target", "mean batch",
                   "P50 s", "P99 s"],
                  [[m, f"{s['ok']}/{s['count']}", tp, b["limit_per_s"], f"{ratio:.3f}x",
                    "met" if ratio >= 0.95 else "**missed** (>= 0.95x)", s.get("mean_batch_size"),
                    s["latency_s"]["p50"], s["latency_s"]["p99"]]])
    ctx.summary.append(f"overload {m}: {tp:.3f} jobs/s = {ratio:.3f}x the bare limit (target >= 0.95x: "
                       f"{'met' if ratio >= 0.95 else 'missed'})")


def s_poisson(ctx: Ctx, m: str) -> None:
    b, sh, cap = ctx.bare[m], ctx.shape(m), ctx.cap("poisson", m)
    ensure_loaded(ctx, m, cap)
    rate = 0.7 * b["limit_per_s"]
    n = max(4, min(MAX_JOBS[ctx.mode], int(rate * 0.6 * cap)))  # arrivals over ~60 % of the cap
    res = bench(ctx.url, m, sh, n, Arrival("poisson", rate=rate), timeout=2 * cap, seed=1)
    for f in check_ok(res, f"poisson {m}"):
        ctx.rep.fail(f)
    s, o = res["summary"], overhead(res)
    ctx.rep.say(f"{m}: {n} jobs, Poisson arrivals at {rate:.3f}/s (70 % of the limit). Latency client-side "
                "(POST to the terminal event); the rest from the job records' breakdowns.\n")
    ctx.rep.table(["model", "jobs ok", "P50 s", "P99 s", "overhead median s (total - inference - output write)",
                   "queue wait median s", "overhead without queue wait, median s", "inference median s",
                   "output write median s"],
                  [[m, f"{s['ok']}/{s['count']}", s["latency_s"]["p50"], s["latency_s"]["p99"], o["overhead"],
                    o["queue"], o["rest"], o["inference"], o["output_write"]]])
    ctx.summary.append(f"Poisson {m} at {rate:.3f}/s: P50 {fmt(s['latency_s']['p50'])} s, P99 "
                       f"{fmt(s['latency_s']['p99'])} s, overhead median {fmt(o['overhead'])} s "
                       f"({fmt(o['rest'])} s without the queue wait)")


def s_step(ctx: Ctx) -> None:
    sm = ctx.step_model
    size, frames, cap, n = STEP_SHAPES[ctx.mode][sm]
    if sm != "sdxl":
        ctx.rep.say("SDXL's family adapter has no step-level driver in this build (`batching = \"step\"` would run "
                    "request-level calls per step-count group), so this section runs on **Wan 2.1 1.3B** instead, "
                    "the published-size model whose family is step-batched.\n")
    sh, mix = ctx.shape(sm), STEP_MIX[ctx.mode]
    budget_s = ctx.cap("step")
    res: dict[str, dict[str, Any]] = {}
    for mode in ("request", "step"):
        name = f"{sm}-{mode}"
        ensure_loaded(ctx, name, budget_s)
        burst = bench(ctx.url, name, sh, n, Arrival("closed", concurrency=n), timeout=2 * budget_s, seed=2,
                      steps=mix, size=size, frames=frames)
        for f in check_ok(burst, f"step section, {name} burst"):
            ctx.rep.fail(f)
        res[f"{mode}/overload"] = first_step(records(ctx.client, burst))
    rate = 0.7 * (res["request/overload"]["throughput"] or 0.0)
    for mode in ("request", "step"):
        name = f"{sm}-{mode}"
        run = bench(ctx.url, name, sh, n, Arrival("poisson", rate=rate), timeout=2 * budget_s, seed=3,
                    steps=mix, size=size, frames=frames)
        for f in check_ok(run, f"step section, {name} Poisson"):
            ctx.rep.fail(f)
        res[f"{mode}/poisson"] = first_step(records(ctx.client, run))
        unload(ctx.client, name, budget_s)  # frees the device for what follows
    ctx.rep.say(f"{sm} at {size}{f' x {frames} frames' if frames else ''}, {mix[0]}/{mix[1]}-step mix "
                f"(even, drawn per job), at most {cap} per batch / running set; {n} jobs per phase. Overload: all "
                f"at once; Poisson at {rate:.3f}/s (70 % of the request-level overload throughput). Time to first "
                "step = received -> the job's inference start.\n")
    rows = [[ph, mode, r["jobs"], f"{fmt(r['ttfs_p50'])} / {fmt(r['ttfs_p99'])}",
             f"{fmt(r['e2e_p50'])} / {fmt(r['e2e_p99'])}", r["throughput"]]
            for (key, r) in res.items() for mode, ph in [key.split("/")]]
    ctx.rep.table(["phase", "mode", "jobs", "time to first step P50 / P99 s", "end to end P50 / P99 s",
                   "throughput jobs/s"], rows)
    q, s = res["request/poisson"], res["step/poisson"]
    ttfs = s["ttfs_p99"] / q["ttfs_p99"] if q["ttfs_p99"] and s["ttfs_p99"] is not None else None
    tput = ((res["step/overload"]["throughput"] or 0) / res["request/overload"]["throughput"]
            if res["request/overload"]["throughput"] else None)
    line = (f"step / request ({sm}): P99 time to first step at 70 % load {fmt(ttfs)}x (target <= 0.1x: "
            f"{'met' if ttfs is not None and ttfs <= 0.1 else 'missed'}); overload throughput {fmt(tput)}x "
            f"(target >= 1: {'met' if tput is not None and tput >= 1 else 'missed'})")
    ctx.rep.say(f"**{line[0].upper()}{line[1:]}.**")
    ctx.summary.append(line)


def s_memory(ctx: Ctx) -> None:
    rows = []
    for m, r in ctx.bare.items():
        for c in r["curve"]:
            ratio = f"{c['estimate_bytes'] / c['peak_bytes']:.2f}" if c["peak_bytes"] else "needs CUDA"
            rows.append([m, c["batch"], gib(c["estimate_bytes"]), gib(c["peak_bytes"]) if c["peak_bytes"] else "–",
                         ratio])
    ctx.rep.say("Working memory per batch: the family estimate (backends/families/memory.py: what a worker "
                "reports and the engine plans with before a shape is measured) vs the allocator's peak above the "
                "weights in the bare runs (what a CUDA worker measures and reports after a batch).\n")
    ctx.rep.table(["model", "batch", "estimate", "device peak", "estimate / peak"], rows)
    ratios = [c["estimate_bytes"] / c["peak_bytes"] for r in ctx.bare.values() for c in r["curve"] if c["peak_bytes"]]
    if ratios:
        ctx.summary.append(f"memory: family estimate / device peak {min(ratios):.2f}-{max(ratios):.2f}")
    view = workers(ctx.client)["data"][0]
    served = {r["model"]: r["bytes"] for r in view.get("resident_models") or []}
    ctx.rep.table(["model", "weights, bare load", "weights, server's worker"],
                  [[m, gib(r["weights_bytes"]), gib(served.get(m)) if m in served else "not resident"]
                   for m, r in ctx.bare.items()])
    ctx.rep.say(f"Worker's view (`/v1/workers`): capacity {gib(view.get('capacity_bytes'))}, engine's plan "
                f"{gib(view.get('used_bytes'))} used, worker-reported {gib(view.get('reported_used_bytes'))}.\n")
    m = ctx.models[0]
    unload(ctx.client, m, ctx.cap("memory"))
    again = load(ctx.client, m, ctx.cap("memory"))
    first = ctx.loads.get(m, {})
    ctx.rep.table(["model", "load", "tier", "seconds", "bytes"],
                  [[m, "first (its files dropped from the page cache before)" if first.get("page_cache_dropped")
                    else "first (its files possibly in the page cache)", first.get("tier"),
                    first.get("seconds"), gib(first.get("bytes"))],
                   [m, "after an unload", again.get("tier"), again.get("seconds"), gib(again.get("bytes"))]])
    if not ctx.device.startswith("cuda"):
        ctx.rep.say("(CPU workers keep no host-RAM copy: the reload's tier is `page_cache`; `host` needs CUDA.)")
    ctx.summary.append(f"{m} load: first {fmt(first.get('seconds'), 2)} s ({first.get('tier')}), after an unload "
                       f"{fmt(again.get('seconds'), 2)} s ({again.get('tier')})")


# ---- main ----------------------------------------------------------------------------------------

def run(ctx: Ctx, work: Path) -> None:
    rep = ctx.rep
    section(ctx, "1. Checkpoints", 0, s_build, work)
    for m in list(ctx.models):
        section(ctx, f"2. Bare pipeline in process: {m}", ctx.cap("bare", m), s_bare, m)
    ctx.models = [m for m in ctx.models if m in ctx.bare]
    if not ctx.models:
        rep.fail("no model ran in process: nothing to serve")
        return
    capable = [m for m in ("sdxl", "wan") if m in ctx.bare and ctx.bare[m]["step_capable"]]
    ctx.step_model = capable[0] if capable else None
    ctx.feats = features()
    gc.collect()
    srv = section(ctx, "3. genserve serve", ctx.cap("server"), s_server, work / "server")
    if srv is None:
        rep.fail("the server did not start: no live figures")
        return
    try:
        for m in ctx.models:
            section(ctx, f"4. Overload: {m} vs the bare limit", ctx.cap("overload", m), s_overload, m)
        section(ctx, f"5. Poisson at 70 % of the limit: {ctx.models[0]}", ctx.cap("poisson", ctx.models[0]),
                s_poisson, ctx.models[0])
        if ctx.step_model:
            mix = STEP_MIX[ctx.mode]
            section(ctx, f"6. Step vs request level, {mix[0]}/{mix[1]}-step mix", ctx.cap("step"), s_step)
        else:
            rep.say("\n## 6. Step vs request level\n\nNot available: no served family has a step-level driver.")
        section(ctx, "7. Memory: estimates vs the device, reload tiers", ctx.cap("memory"), s_memory)
        hook_sections(ctx, section)
        for m in ctx.models[1:] if ctx.mode == "gpu" else ():  # the dry run ran this code in section 5
            section(ctx, f"9. Poisson at 70 % of the limit: {m}", ctx.cap("poisson", m), s_poisson, m)
    finally:
        ctx.client.close()
        srv.stop()
        if srv.proc is None and "Traceback" in srv.log():
            rep.say(f"\nServer log tail:\n```\n{srv.log()[-3000:]}\n```")


# What the server and its worker import beyond torch / diffusers / transformers (the device machine
# has no network: a missing one must stop the run before minutes of building, not after).
SERVER_PACKAGES = ("fastapi", "uvicorn", "httpx", "av", "ftfy", "prometheus_client", "safetensors")


def missing_packages() -> list[str]:
    import importlib.util

    return [p for p in SERVER_PACKAGES if importlib.util.find_spec(p) is None]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny family configs, a few jobs (CI)")
    ap.add_argument("--flux", action="store_true",
                    help="also FLUX.1-schnell (~34 GB on disk; ~3 more minutes: give --budget-s 620)")
    ap.add_argument("--device", help="default cuda:0 (cpu with --dry-run)")
    ap.add_argument("--budget-s", type=float, help="wall-clock budget (default 440 on a GPU, 300 dry)")
    ap.add_argument("--work", type=Path, help="checkpoints and server data (default: a temporary directory; "
                                              "checkpoints found there are reused)")
    ap.add_argument("--out", type=Path, help="report (default benchmarks/results/gpu-live-<date>.md)")
    a = ap.parse_args(argv)
    mode = "dry" if a.dry_run else "gpu"
    device = a.device or ("cpu" if a.dry_run else "cuda:0")
    if mode == "gpu" and not device.startswith("cuda"):
        ap.error("a GPU run needs a CUDA device (use --dry-run on a CPU)")
    out = a.out or REPO / "benchmarks" / "results" / f"gpu-live-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.md"
    budget = Budget(a.budget_s or (300 if a.dry_run else 440))
    work = a.work or Path(tempfile.mkdtemp(prefix="gpu-live-"))
    work.mkdir(parents=True, exist_ok=True)
    rep = Report()
    rep.say(f"# genserve live on {'a GPU' if mode == 'gpu' else 'the CPU (dry run: tiny configs)'}"
            " — benchmarks/gpu_live.py\n")
    for line in environment(device):
        rep.say(line)
    rep.say(f"- budget {budget.total_s:.0f} s; models: sdxl, wan{', flux' if a.flux else ''}; work dir `{work}`")
    ctx = Ctx(mode, device, rep, budget, ["sdxl", "wan"] + (["flux"] if a.flux else []))
    try:
        missing = missing_packages()
        if missing:
            rep.fail(f"this Python lacks {', '.join(missing)} (genserve's dependencies): nothing was run")
        else:
            run(ctx, work)
    except Exception as e:  # noqa: BLE001 - the report is written whatever happened
        rep.fail(f"{type(e).__name__}: {e}")
        rep.say("```\n" + traceback.format_exc()[-3000:] + "```")
    if ctx.summary:
        rep.say("\n## Summary\n\n" + "\n".join(f"- {x}" for x in ctx.summary))
    rep.say(f"\n## Result\n\nWall time {budget.used():.0f} s of a {budget.total_s:.0f} s budget. "
            + ("**Run failed:** " + "; ".join(rep.failures) if rep.failures else "Run completed: every job succeeded."))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(rep.text())
    print(f"report: {out}", flush=True)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
