"""Helpers of benchmarks/gpu_live.py: the report and time budget, the bare pipeline in process, the
generated genserve.toml, and the HTTP side (model loads through the API, ``genserve bench`` runs,
job records). The sections themselves are in gpu_live.py."""
from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from genserve.bench import runner as bench_runner
from genserve.bench.workload import Arrival, Workload

MIB, GIB = 1 << 20, 1 << 30


@dataclass(frozen=True)
class Shape:
    """What one model is asked for in this run."""

    kind: str  # image | video
    size: str  # WxH
    steps: int
    guidance: float | None  # None: the family has no guidance input (FLUX-schnell)
    frames: int
    batches: tuple[int, ...]  # the in-process batch curve
    dtype: str
    extra: tuple[tuple[str, Any], ...] = ()  # more [models.NAME] keys (max_sequence_length, …)

    @property
    def wh(self) -> tuple[int, int]:
        w, _, h = self.size.partition("x")
        return int(w), int(h)


# ---- report and budget -------------------------------------------------------------------------

def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def gib(nbytes: int | None) -> str:
    """Bytes with a unit: GiB from 64 MiB up (device-sized figures), MiB below (the dry run's)."""
    return "–" if nbytes is None else f"{nbytes / GIB:.3f} GiB" if nbytes >= 64 * MIB else f"{nbytes / MIB:.2f} MiB"


class Report:
    """The Markdown report, built as the run goes; ``failures`` make the exit status non-zero."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failures: list[str] = []

    def say(self, text: str = "") -> None:
        self.lines.append(text)
        print(text, flush=True)

    def table(self, head: list[str], rows: list[list[Any]]) -> None:
        self.say("| " + " | ".join(head) + " |")
        self.say("|" + "---|" * len(head))
        for r in rows:
            self.say("| " + " | ".join(fmt(x) for x in r) + " |")
        self.say()

    def fail(self, what: str) -> None:
        self.failures.append(what)
        self.say(f"**FAILED:** {what}\n")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Budget:
    """The run's wall-clock budget. A section runs only if its cap fits in what is left; inside it,
    work is sized to the cap from measured costs (``deadline``)."""

    def __init__(self, total_s: float) -> None:
        self.total_s, self.t0 = total_s, time.monotonic()

    def used(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.total_s - self.used()

    def fits(self, cap_s: float) -> bool:
        return self.left() >= cap_s


# ---- the bare pipeline, in process -------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def bare(name: str, path: Path, shape: Shape, device: str, deadline: float, reps: int = 1) -> dict[str, Any]:
    """The pipeline alone: loaded with the worker's own loader (``PipelineRunner.load``), called with
    the worker's own arguments (the family adapter's ``call_kwargs``), no server, no encoding, no
    writes. Per batch size: seconds per call, jobs/s, the allocator's peak above the weights (CUDA)
    and the family's working-memory estimate (what the engine plans with before a measurement).
    ``reps``: calls per batch size, the fastest kept (a shared CPU is noisy; a GPU is not)."""
    import torch

    from genserve.backends.runner import PipelineRunner, dtype_bytes_of
    from genserve.storage.results import LocalResultStore

    runner = PipelineRunner(device, LocalResultStore(Path(tempfile.mkdtemp(prefix="gpu-live-bare-"))))
    _sync(device)
    t0 = time.perf_counter()
    info = runner.load(name, {"path": str(path), "dtype": shape.dtype, "kind": shape.kind, **dict(shape.extra)})
    _sync(device)
    load_s = time.perf_counter() - t0
    pipe, adapter = runner.pipes[name], runner.adapters[name]
    w, h = shape.wh
    out: dict[str, Any] = {"load_s": load_s, "weights_bytes": info["bytes"], "curve": [], "not_run": [],
                           "step_capable": adapter.step_driver(pipe) is not None}

    def call(n: int, steps: int) -> tuple[float, int]:
        jobs = [{"id": f"bare-{n}-{i}", "prompt": f"a lighthouse at dusk, bare {n}.{i}", "seed": i} for i in range(n)]
        params = {"width": w, "height": h, "steps": steps, "guidance": shape.guidance or 0.0,
                  "num_frames": shape.frames, "fps": 16}
        kw = adapter.call_kwargs(jobs, params)
        kw["generator"] = [torch.Generator(device="cpu").manual_seed(j["seed"]) for j in jobs]
        kw["output_type"] = "np" if shape.kind == "video" else "pil"
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            pipe(**kw)
        _sync(device)
        secs = time.perf_counter() - t
        return secs, int(torch.cuda.max_memory_allocated(device) - base) if cuda else 0

    call(1, min(2, shape.steps))  # warm-up: kernels, allocator, autotuning
    for n in shape.batches:
        last = out["curve"][-1] if out["curve"] else None
        # the next call costs about (n / last n) × the last one where the device is compute-bound
        if last and time.monotonic() + reps * last["seconds"] * n / last["batch"] > deadline:
            out["not_run"].append(n)
            continue
        runs = [call(n, shape.steps) for _ in range(reps)]
        secs, peak = min(r[0] for r in runs), max(r[1] for r in runs)
        est = adapter.working_bytes(n, w, h, shape.frames, shape.guidance or 0.0, dtype_bytes_of(pipe))
        out["curve"].append({"batch": n, "seconds": secs, "per_s": n / secs, "peak_bytes": peak, "estimate_bytes": est})
    best = max(out["curve"], key=lambda r: r["per_s"])
    out["limit_per_s"], out["best_batch"], out["best_seconds"] = best["per_s"], best["batch"], best["seconds"]
    runner.unload(name)
    pipe = adapter = None  # the weights go with the last references
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


# ---- genserve.toml ------------------------------------------------------------------------------

def model_table(name: str, source: Path, shape: Shape, *, max_batch: int, wait_ms: int, batching: str = "request",
                size: str | None = None, frames: int | None = None) -> str:
    frames = shape.frames if frames is None else frames
    lines = [f"[models.{name}]", f'kind = "{shape.kind}"', f'source = "{source}"', f'dtype = "{shape.dtype}"',
             f'batching = "{batching}"', f"max_batch_size = {max_batch}", f"max_wait_ms = {wait_ms}",
             f'sizes = ["{size or shape.size}"]', f"default_steps = {shape.steps}", "max_steps = 100",
             "timeout_s = 3600"]
    if shape.guidance is not None:
        lines.append(f"default_guidance = {shape.guidance}")
    if shape.kind == "video":
        lines += [f"default_frames = {frames}", f"max_frames = {frames}", "fps = 16"]
    lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in shape.extra]
    return "\n".join(lines) + "\n"


def server_table(host_cache_gb: int) -> str:
    # One attempt per job: a failure is reported as one, never retried into a success. No idle
    # unloads: the run loads and unloads models itself (POST /v1/models/{name}/load|unload).
    return (f'[server]\nidle_unload_s = "never"\nhost_cache_gb = {host_cache_gb}\nmax_attempts = 1\n'
            "hang_timeout_s = 900\n")


# ---- the HTTP side -------------------------------------------------------------------------------

def workers(c: httpx.Client) -> dict[str, Any]:
    r = c.get("/v1/workers")
    r.raise_for_status()
    return r.json()


def resident(c: httpx.Client, model: str) -> bool:
    return any(r["model"] == model and not r["loading"]
               for w in workers(c)["data"] for r in w.get("resident_models") or [])


def _poll(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} after {timeout:.0f} s")


def last_load(c: httpx.Client, model: str) -> dict[str, Any] | None:
    loads = [e for e in workers(c)["recent_residency_changes"] if e["action"] == "load" and e["model"] == model]
    return loads[-1] if loads else None


def load(c: httpx.Client, model: str, timeout: float) -> dict[str, Any]:
    """Load ``model`` through the API and wait until it is resident; the load's log entry (tier,
    bytes, seconds as the worker measured them), or ``{"tier": "resident"}`` if it already was."""
    before = last_load(c, model)
    r = c.post(f"/v1/models/{model}/load")
    if r.status_code == 200:
        return {"tier": "resident"}
    if r.status_code != 202:
        raise RuntimeError(f"POST /v1/models/{model}/load: {r.status_code} {r.text}")
    _poll(lambda: resident(c, model), timeout, f"{model} not loaded")
    entry = last_load(c, model)
    return entry if entry is not None and entry != before else {"tier": "?"}


def drop_page_cache(path: Path) -> bool:
    """Ask the kernel to drop ``path``'s files from the page cache (after an fsync: dirty pages would
    stay), so that the next load reads the disk. False where the platform cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in Path(path).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def ensure_loaded(ctx: Any, model: str, timeout: float) -> dict[str, Any]:
    """``load`` through ``ctx.client``. A model's first load is remembered in ``ctx.loads``, and its
    files are dropped from the page cache before it (the in-process run has just read them), so it
    is a real disk read: the figure the host-RAM reload is compared with."""
    first = model not in ctx.loads and model in ctx.paths
    cold = drop_page_cache(ctx.paths[model]) if first else False
    info = load(ctx.client, model, timeout)
    ctx.loads.setdefault(model, {**info, "page_cache_dropped": cold})
    return info


def unload(c: httpx.Client, model: str, timeout: float) -> None:
    r = c.post(f"/v1/models/{model}/unload")
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/models/{model}/unload: {r.status_code} {r.text}")
    _poll(lambda: not resident(c, model), timeout, f"{model} still resident")


def bench(url: str, model: str, shape: Shape, n: int, arrival: Arrival, *, timeout: float, seed: int = 0,
          steps: tuple[int, ...] | None = None, size: str | None = None, frames: int | None = None) -> dict[str, Any]:
    """One ``genserve bench`` run (its own code: genserve.bench.runner) of ``n`` jobs of ``model``,
    an even mix of ``steps`` (default: the shape's)."""
    frames = shape.frames if frames is None else frames
    reqs = tuple({"weight": 1.0, "model": model, "size": size or shape.size, "steps": s,
                  **({"num_frames": frames} if shape.kind == "video" else {})} for s in steps or (shape.steps,))
    return asyncio.run(bench_runner.run(url, Workload(reqs, arrival), n, seed=seed, timeout=timeout, label=model))


def check_ok(result: dict[str, Any], what: str) -> list[str]:
    """The failed jobs of a bench run, as lines for the report (empty: all succeeded)."""
    s = result["summary"]
    if s["errors"]:
        return [f"{what}: {s['errors']} of {s['count']} jobs failed ({s['errors_by_kind']})"]
    return []


def records(c: httpx.Client, result: dict[str, Any]) -> list[dict[str, Any]]:
    return [c.get(f"/v1/jobs/{r['job_id']}").json() for r in result["requests"] if r.get("job_id")]


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * p / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def overhead(result: dict[str, Any]) -> dict[str, float | None]:
    """Medians over the jobs' breakdowns: genserve's overhead as the issue defines it (total −
    inference − output write, so it holds the queue wait), the queue wait, and what is left
    without it (HTTP, persistence, engine, dispatch, the worker's set-up around the call)."""
    bds = [r["breakdown"] for r in result["requests"] if r.get("ok") and r.get("breakdown")]
    over, queue, rest = [], [], []
    for b in bds:
        if None in (b.get("total_s"), b.get("inference_s"), b.get("output_write_s")):
            continue
        o = b["total_s"] - b["inference_s"] - b["output_write_s"]
        over.append(o)
        queue.append(b.get("queue_wait_s") or 0.0)
        rest.append(o - (b.get("queue_wait_s") or 0.0) - (b.get("cold_start_s") or 0.0))
    med = lambda xs: statistics.median(xs) if xs else None
    return {"jobs": len(over), "overhead": med(over), "queue": med(queue), "rest": med(rest),
            "inference": med([b["inference_s"] for b in bds if b.get("inference_s") is not None]),
            "output_write": med([b["output_write_s"] for b in bds if b.get("output_write_s") is not None])}


def first_step(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Time to first step (received → the job's inference start: request level, its batch's call
    starting; step level, the job entering the running set), end to end, and throughput over the
    span from the first arrival to the last finish, from the job records."""
    ts = [r["timestamps"] for r in recs if r.get("status") == "succeeded"]
    first = [t["inference_start"] - t["received"] for t in ts]
    e2e = [t["finished"] - t["received"] for t in ts]
    span = max(t["finished"] for t in ts) - min(t["received"] for t in ts) if ts else 0.0
    return {"jobs": len(ts), "ttfs_p50": pct(first, 50), "ttfs_p99": pct(first, 99), "e2e_p50": pct(e2e, 50),
            "e2e_p99": pct(e2e, 99), "throughput": len(ts) / span if span > 0 else None}
