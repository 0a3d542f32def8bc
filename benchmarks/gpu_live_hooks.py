"""The sections of benchmarks/gpu_live.py that measure levers other issues add: LoRA per request
(issue 23: mixed-adapter vs split batches) and faster runs (issue 24: a compiled denoiser and a
per-request step cache vs plain). Each runs only when this build has the feature, probed from the
config's own key registry (``[loras.NAME]`` tables and ``lora_batching``; ``compile`` / ``caches``
model keys) and, for LoRA, ``GET /v1/loras``; otherwise the report says "not available in this
build". The requests and keys follow the issues' specifications; the first run against a build that
has the feature (the CPU dry run in CI does that) checks them against what landed."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gpu_live_bench import check_ok, ensure_loaded, model_table

from genserve.bench import runner as bench_runner
from genserve.bench.workload import Arrival, Workload

ADAPTERS = 8  # distinct LoRAs in the mixed-adapter runs
LORA_RANK = 16
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEEP_CACHE = {"method": "deep", "interval": 3}


def features() -> dict[str, bool]:
    try:
        from genserve.config.load import SECTIONS

        keys, sections = SECTIONS["models"].known_keys(), set(SECTIONS)
    except (ImportError, KeyError, AttributeError):
        keys, sections = set(), set()
    return {"lora": "loras" in sections and "lora_batching" in keys, "compile": "compile" in keys,
            "cache": "caches" in keys}


def build_lora(unet_dir: Path, out: Path, seed: int) -> Path:
    """A random LoRA (non-zero A and B, so it changes the output) on the UNet's attention
    projections, in the diffusers / PEFT key layout (``unet.<module>.lora_A.weight``), as safetensors."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(LORA_TARGETS):
            a = torch.randn(LORA_RANK, mod.in_features, generator=g) * 0.01
            b = torch.randn(mod.out_features, LORA_RANK, generator=g) * 0.01
            tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = a.half(), b.half()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def hook_tables(ctx: Any) -> str:
    """The genserve.toml tables the hook sections need (none where the build lacks the feature)."""
    if "sdxl" not in ctx.bare:
        return ""
    sh, path, best = ctx.shape("sdxl"), ctx.paths["sdxl"], ctx.bare["sdxl"]["best_batch"]
    out = ""
    if ctx.feats.get("lora"):
        files = [build_lora(path / "unet", path.parent / "loras" / f"gl{i}.safetensors", seed=i)
                 for i in range(ADAPTERS)]
        for mode in ("mixed", "split"):
            out += model_table(f"sdxl-lora-{mode}", path, sh, max_batch=best, wait_ms=100)
            out += f'lora_batching = "{mode}"\n\n'
            for i, f in enumerate(files):  # the same adapter files, registered for each entry
                out += f'[loras.gl{i}-{mode}]\nmodel = "sdxl-lora-{mode}"\nsource = "{f}"\n\n'
    if ctx.feats.get("compile") or ctx.feats.get("cache"):
        out += model_table("sdxl-speed", path, sh, max_batch=best, wait_ms=100)
        out += ('compile = "regional"\n' if ctx.feats.get("compile") else "")
        out += (f'caches = ["{DEEP_CACHE["method"]}"]\n' if ctx.feats.get("cache") else "") + "\n"
    return out


def _burst(ctx: Any, model: str, n: int, extra: list[dict[str, Any]] | None, cap: float) -> dict[str, Any]:
    """n jobs of ``model`` in a closed loop of 2 x the best batch; ``extra``: request fields, one per
    class of an even mix (each job draws one)."""
    sh, best = ctx.shape("sdxl"), ctx.bare["sdxl"]["best_batch"]
    base = {"weight": 1.0, "model": model, "size": sh.size, "steps": sh.steps}
    reqs = tuple({**base, **e} for e in (extra or [{}]))
    res = asyncio.run(bench_runner.run(ctx.url, Workload(reqs, Arrival("closed", concurrency=2 * best)), n,
                                       seed=5, timeout=2 * cap, label=model))
    for f in check_ok(res, f"{model} burst"):
        ctx.rep.fail(f)
    return res


def _row(name: str, res: dict[str, Any]) -> list[Any]:
    s = res["summary"]
    return [name, f"{s['ok']}/{s['count']}", s["throughput_per_s"], s.get("mean_batch_size"), s["latency_s"]["p50"],
            s["latency_s"]["p99"]]


HEAD = ["run", "jobs ok", "jobs/s", "mean batch", "P50 s", "P99 s"]


def s_lora(ctx: Any) -> None:
    listed = ctx.client.get("/v1/loras")
    if listed.status_code != 200:
        raise RuntimeError(f"config has [loras] but GET /v1/loras answered {listed.status_code}")
    cap, n = ctx.cap("lora"), 2 * ctx.bare["sdxl"]["best_batch"]
    rows = []
    for mode in ("mixed", "split"):
        model = f"sdxl-lora-{mode}"
        ensure_loaded(ctx, model, cap)
        mix = [{"loras": [{"name": f"gl{i}-{mode}", "scale": 1.0}]} for i in range(ADAPTERS)]
        rows.append(_row(f"{ADAPTERS} adapters, {mode}", _burst(ctx, model, n, mix, cap)))
    rows.append(_row("no adapter (plain sdxl)", _burst(ctx, "sdxl", n, None, cap)))
    ctx.rep.say(f"SDXL at {ctx.shape('sdxl').size}, {n} jobs each drawing one of {ADAPTERS} random rank-"
                f"{LORA_RANK} adapters (attention projections), closed loop.\n")
    ctx.rep.table(HEAD, rows)


def s_speed(ctx: Any) -> None:
    cap, n = ctx.cap("speed"), 2 * ctx.bare["sdxl"]["best_batch"]
    ld = ensure_loaded(ctx, "sdxl-speed", cap)  # compiling counts as the load (cold start)
    rows = [_row("plain (sdxl)", _burst(ctx, "sdxl", n, None, cap))]
    if ctx.feats.get("compile"):
        rows.append(_row("compile = regional", _burst(ctx, "sdxl-speed", n, None, cap)))
    if ctx.feats.get("cache"):
        label = ("compile = regional + " if ctx.feats.get("compile") else "") + f"cache {DEEP_CACHE}"
        rows.append(_row(label, _burst(ctx, "sdxl-speed", n, [{"cache": DEEP_CACHE}], cap)))
    ctx.rep.say(f"SDXL at {ctx.shape('sdxl').size}, {n} jobs per run, closed loop; sdxl-speed loaded in "
                f"{ld.get('seconds')} s ({ld.get('tier')}).\n")
    ctx.rep.table(HEAD, rows)


def hook_sections(ctx: Any, section) -> None:
    for key, title, fn, why in (
            ("lora", "8a. LoRA: mixed-adapter vs split batches", s_lora,
             "no `[loras]` config section / `lora_batching` model key"),
            ("speed", "8b. Speed: compiled denoiser and a step cache vs plain", s_speed,
             "no `compile` / `caches` model keys")):
        have = ctx.feats.get(key) if key == "lora" else (ctx.feats.get("compile") or ctx.feats.get("cache"))
        if have and "sdxl" in ctx.bare:
            section(ctx, title, ctx.cap(key), fn)
        else:
            ctx.rep.say(f"\n## {title}\n\nNot available in this build ({why}).")

