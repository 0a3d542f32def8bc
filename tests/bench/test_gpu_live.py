"""benchmarks/gpu_live.py (issue 26): its helpers, and its whole code path on the CPU (``--dry-run``:
the tiny family configs, a real ``genserve serve``, a few jobs), so the GPU script cannot rot
between device loans."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_live import STEP_MIX, Ctx, section  # noqa: E402
from gpu_live_bench import Budget, Report, Shape, first_step, model_table, overhead, server_table  # noqa: E402

from genserve.config.load import load_config  # noqa: E402

NUM = r"[0-9]+\.[0-9]+"


def _ctx(budget_s: float) -> Ctx:
    return Ctx("dry", "cpu", Report(), Budget(budget_s), ["sdxl"])


def test_a_section_that_raises_fails_the_run_and_one_that_does_not_fit_is_skipped():
    ctx = _ctx(100)
    section(ctx, "boom", 10, lambda c: 1 / 0)
    assert ctx.rep.failures == ["boom: ZeroDivisionError: division by zero"]
    assert "**FAILED:** boom" in ctx.rep.text()
    ran = []
    section(ctx, "too big", 1000, lambda c: ran.append(1))
    assert not ran and "_Skipped: needs up to 1000 s" in ctx.rep.text()
    assert section(ctx, "fits", 10, lambda c: 42) == 42 and len(ctx.rep.failures) == 1


def test_generated_config_is_valid_genserve_toml(tmp_path):
    video = Shape("video", "32x32", 2, 5.0, 5, (1, 2), "float32")
    flux = Shape("image", "64x64", 2, None, 0, (1,), "bfloat16", (("max_sequence_length", 256),))
    text = (server_table(1) + "\n" + model_table("wan", tmp_path / "wan", video, max_batch=2, wait_ms=100)
            + "\n" + model_table("wan-step", tmp_path / "wan", video, max_batch=4, wait_ms=0, batching="step",
                                 size="48x32", frames=9)
            + "\n" + model_table("flux", tmp_path / "flux", flux, max_batch=1, wait_ms=0))
    (tmp_path / "genserve.toml").write_text(text)
    cfg = load_config(tmp_path / "genserve.toml")
    wan, step, fl = cfg.models["wan"], cfg.models["wan-step"], cfg.models["flux"]
    assert (wan.max_batch_size, wan.max_wait_ms, wan.batching, wan.dtype) == (2, 100, "request", "float32")
    assert (step.batching, step.max_batch_size, step.sizes, step.default_frames) == ("step", 4, ((48, 32),), 9)
    assert fl.family.max_sequence_length == 256 and fl.dtype == "bfloat16"


def test_overhead_and_first_step_come_from_the_job_records():
    bd = [{"total_s": 3.0, "inference_s": 2.0, "output_write_s": 0.1, "queue_wait_s": 0.5, "cold_start_s": None},
          {"total_s": 5.0, "inference_s": 2.0, "output_write_s": 0.2, "queue_wait_s": 2.0, "cold_start_s": 0.5}]
    o = overhead({"requests": [{"ok": True, "breakdown": b} for b in bd] + [{"ok": False, "breakdown": None}]})
    assert o["jobs"] == 2
    assert o["overhead"] == pytest.approx((0.9 + 2.8) / 2) and o["queue"] == pytest.approx(1.25)
    assert o["rest"] == pytest.approx((0.4 + 0.3) / 2)
    recs = [{"status": "succeeded", "timestamps": {"received": 0.0, "inference_start": 0.5, "finished": 2.0}},
            {"status": "succeeded", "timestamps": {"received": 1.0, "inference_start": 3.0, "finished": 4.0}},
            {"status": "failed", "timestamps": {"received": 0.0}}]
    f = first_step(recs)
    assert f["jobs"] == 2 and f["ttfs_p50"] == pytest.approx(1.25) and f["throughput"] == pytest.approx(0.5)


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}.*?(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no section {title!r} in the report"
    return m.group(0)


def _rows(block: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in block.splitlines() if line.startswith(f"| {first_cell} ")]


@pytest.mark.slow
def test_dry_run_reports_every_section(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_live.py"), "--dry-run", "--budget-s", "1500",
         "--out", str(out), "--work", str(tmp_path / "work")],
        check=False, capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    check_report(out.read_text())


def check_report(text: str) -> None:
    """Every section ran and reported its figures, in the shapes the GPU report will have them."""
    assert "_Skipped" not in text and "FAILED" not in text
    assert "Run completed: every job succeeded." in text
    assert re.search(r"device: \*\*CPU .*torch [0-9.]+", text, re.S)

    built = _section(text, "1. Checkpoints")
    for m in ("sdxl", "wan"):
        assert _rows(built, m) and "MiB" in _rows(built, m)[0][4]
        bare = _section(text, f"2. Bare pipeline in process: {m}")
        limit = re.search(rf"Limit \({m}\): ({NUM}) jobs/s at batch ([0-9]+)", bare)
        assert limit and float(limit.group(1)) > 0
        over = _rows(_section(text, f"4. Overload: {m}"), m)[0]
        ok, n = over[1].split("/")
        assert ok == n and int(n) >= 2 and float(over[2]) > 0 and float(over[4].rstrip("x")) > 0
    assert "genserve serve` ready in" in _section(text, "3. genserve serve")

    poisson = _rows(_section(text, "5. Poisson at 70 % of the limit: sdxl"), "sdxl")[0]
    ok, n = poisson[1].split("/")
    assert ok == n and int(n) >= 4
    p50, p99, over_med, queue, rest, infer, write = (float(x) for x in poisson[2:9])
    assert 0 < p50 <= p99 and infer > 0 and write >= 0 and queue >= 0
    assert 0 <= rest <= over_med <= p50  # per job: rest <= overhead <= server total <= client latency

    short, long = STEP_MIX["dry"]
    step = _section(text, f"6. Step vs request level, {short}/{long}-step mix")
    assert "runs on **Wan 2.1 1.3B** instead" in step  # SDXL has no step driver in this build
    for phase in ("overload", "poisson"):
        modes = {r[1]: r for r in _rows(step, phase)}
        assert set(modes) == {"request", "step"}
        for r in modes.values():
            assert re.fullmatch(rf"{NUM} / {NUM}", r[3]) and float(r[5]) > 0
    assert re.search(rf"P99 time to first step at 70 % load {NUM}x", step)

    mem = _section(text, "7. Memory")
    assert {r[0] for r in _rows(mem, "sdxl") + _rows(mem, "wan")} == {"sdxl", "wan"}
    assert any(r[2].endswith("MiB") and r[4] == "needs CUDA" for r in _rows(mem, "sdxl"))
    tiers = [r[2] for r in _rows(mem, "sdxl") if len(r) == 5 and r[2] in ("disk", "page_cache", "host")]
    assert tiers == ["disk", "page_cache"]
    for title in ("8a. LoRA", "8b. Speed"):
        hook = _section(text, title)
        assert "Not available in this build" in hook or "| run |" in hook

    summary = _section(text, "Summary")
    for line in (rf"overload sdxl: {NUM} jobs/s = {NUM}x the bare limit", rf"overload wan: {NUM} jobs/s",
                 rf"Poisson sdxl at {NUM}/s: P50 {NUM} s, P99 {NUM} s, overhead median {NUM} s",
                 rf"step / request \(wan\): P99 time to first step at 70 % load {NUM}x",
                 rf"sdxl load: first {NUM} s \(disk\), after an unload {NUM} s \(page_cache\)"):
        assert re.search(line, summary), line
