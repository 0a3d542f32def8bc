"""GPU check: the worker's own code path (``PipelineRunner``) on this machine's accelerator.

On a CUDA machine it
  1. runs the demo image and video models in fp16 and checks the outputs decode;
  2. measures the batch curve (batch size -> seconds, images/s, peak memory) of a larger
     random-weight SD-style model;
  3. times reloads per tier: disk (first load), host RAM (unload keeps it in the host cache,
     then load again) and disk again with the host cache off;
  4. compares the runner's memory accounting (``memory_allocated`` deltas) with what
     ``torch.cuda.mem_get_info`` says is gone from the device (the allocator's reserve and the
     CUDA context are the difference);
  5. reads the NVML metrics the server exports (``server.metrics.nvml_stats``), and the card's
     power and temperature, when ``pynvml`` (nvidia-ml-py) is installed.
On a CPU machine it runs what it can (demo models in float32, a small batch curve, disk reloads)
and marks the rest "needs CUDA". Prints markdown for benchmarks/RESULTS.md.

    python benchmarks/gpu_check.py [--device cuda:0] [--batches 1,2,4,8,16] [--size 512] [--out FILE]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from genserve.backends.demo import ensure_demo_model, vocab_size, _write_tokenizer
from genserve.backends.runner import PipelineRunner
from genserve.server.observe.metrics import nvml_stats
from genserve.storage.results import LocalResultStore

MIB = 1 << 20
NEEDS_CUDA = "needs CUDA"


def build_large(out: Path, width: int = 128) -> Path:
    """A random-weight SD-1.5-shaped pipeline, ``width`` channels wide at the top (SD 1.5: 320)."""
    if (out / "model_index.json").exists():
        return out
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    chans = (width, width * 2, width * 4, width * 4)
    unet = UNet2DConditionModel(
        block_out_channels=chans, layers_per_block=2, sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(64, 128, 256, 256), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size(), hidden_size=256, intermediate_size=1024,
                                        num_attention_heads=8, num_hidden_layers=6, max_position_embeddings=77,
                                        bos_token_id=vocab_size() - 2, eos_token_id=vocab_size() - 1,
                                        pad_token_id=vocab_size() - 1))
    _write_tokenizer(out / "_tok")
    tok = CLIPTokenizer.from_pretrained(out / "_tok")
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(out)
    return out


def batch(runner: PipelineRunner, model: str, kind: str, n: int, size: int, steps: int, frames: int = 0,
          fps: int = 8) -> tuple[float, int, int]:
    """Run one batch of ``n``; returns (seconds, peak working bytes, outputs written)."""
    written = []
    params: dict[str, Any] = {"width": size, "height": size, "steps": steps, "guidance": 1.0, "fps": fps}
    if kind == "video":
        params["num_frames"] = frames
    msg = {"batch_id": f"b{time.monotonic_ns()}", "kind": kind, "model": model, "params": params,
           "jobs": [{"id": f"{model}-{n}-{i}-{time.monotonic_ns()}", "prompt": f"check {i}", "seed": i} for i in range(n)]}
    sync(runner)
    t0 = time.perf_counter()
    peak = runner.run(msg, lambda ev: written.append(ev) if ev["ev"] == "job_done" else None, set())
    sync(runner)
    return time.perf_counter() - t0, peak, len(written)


def sync(runner: PipelineRunner) -> None:
    if runner.cuda:
        torch.cuda.synchronize(runner.device)


def timed_load(runner: PipelineRunner, model: str, path: Path, dtype: str, kind: str = "image") -> dict[str, Any]:
    sync(runner)
    t0 = time.perf_counter()
    info = runner.load(model, {"path": str(path), "dtype": dtype, "kind": kind})
    sync(runner)
    return {**info, "seconds": time.perf_counter() - t0}


def mem_info(runner: PipelineRunner) -> tuple[int, int]:
    return torch.cuda.mem_get_info(runner.device) if runner.cuda else (0, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default=None, help="batch sizes of the curve (default: 1,2,4,8,16 on CUDA, 1,2,4 on CPU)")
    ap.add_argument("--size", type=int, default=None, help="image side of the curve (default 512 on CUDA, 64 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="steps per batch of the curve (default 20 on CUDA, 4 on CPU)")
    ap.add_argument("--width", type=int, default=None, help="the larger model's top channel width (default 128 on CUDA, 32 on CPU)")
    ap.add_argument("--work", help="directory for built models (default: a temporary one)")
    ap.add_argument("--out", help="also write the markdown here")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    batches = [int(x) for x in (a.batches or ("1,2,4,8,16" if cuda else "1,2,4")).split(",")]
    size, steps = a.size or (512 if cuda else 64), a.steps or (20 if cuda else 4)
    width = a.width or (128 if cuda else 32)
    work = Path(a.work or tempfile.mkdtemp(prefix="genserve-gpu-check-"))
    lines: list[str] = []
    say = lines.append

    name = torch.cuda.get_device_name(a.device) if cuda else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    say(f"## gpu_check — {name}\n")
    say(f"torch {torch.__version__}, CUDA {torch.version.cuda or '-'}, python {platform.python_version()}, "
        f"device `{a.device}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    dtype = "float16" if cuda else "float32"
    store = LocalResultStore(work / "results")

    # 1. demo models
    say(f"### Demo models ({dtype})\n\n| model | load s | resident MiB | batch | run s | peak MiB | outputs |\n|---|---|---|---|---|---|---|")
    runner = PipelineRunner(a.device, store)
    for kind, n, frames in (("image", 4, 0), ("video", 1, 9)):
        path = ensure_demo_model(kind, work / f"demo-{kind}")
        ld = timed_load(runner, f"demo-{kind}", path, dtype, kind)
        secs, peak, outs = batch(runner, f"demo-{kind}", kind, n, 64, 4, frames)
        ok = "ok" if outs == n else f"{outs}/{n}"
        say(f"| demo-{kind} | {ld['seconds']:.2f} | {ld['bytes'] / MIB:.1f} | {n} | {secs:.2f} | {peak / MIB:.1f} | {ok} |")
        runner.unload(f"demo-{kind}")

    # 2. batch curve of a larger model
    t0 = time.perf_counter()
    large = build_large(work / f"large-{width}", width)
    say(f"\n### Batch curve: random-weight SD-shaped model (top width {width}, built in {time.perf_counter() - t0:.1f} s), "
        f"{size}x{size}, {steps} steps\n")
    free0, total = mem_info(runner)
    ld = timed_load(runner, "large", large, dtype)
    free1, _ = mem_info(runner)
    batch(runner, "large", "image", 1, size, 2)  # warm-up: kernels, allocator
    say("| batch | s / batch | images / s | s / image | peak working MiB |\n|---|---|---|---|---|")
    base = None
    for n in batches:
        try:
            secs, peak, _ = batch(runner, "large", "image", n, size, steps)
        except torch.cuda.OutOfMemoryError:
            say(f"| {n} | OOM | | | |")
            break
        base = base or secs
        say(f"| {n} | {secs:.3f} | {n / secs:.2f} | {secs / n:.3f} | {peak / MIB:.0f} |")

    # 3. memory accounting
    say("\n### Memory accounting\n")
    if cuda:
        reserved = torch.cuda.memory_reserved(a.device)
        say("| measure | MiB |\n|---|---|")
        say(f"| device total (mem_get_info) | {total / MIB:.0f} |")
        say(f"| weights: runner's memory_allocated delta | {ld['bytes'] / MIB:.0f} |")
        say(f"| weights: mem_get_info free delta at load | {(free0 - free1) / MIB:.0f} |")
        say(f"| allocator reserved now | {reserved / MIB:.0f} |")
        say(f"| not seen by the allocator (context, other processes) | {(total - mem_info(runner)[0] - reserved) / MIB:.0f} |")
    else:
        say(f"{NEEDS_CUDA}: on CPU the runner counts parameter bytes ({ld['bytes'] / MIB:.1f} MiB for the larger model).")

    # 4. reload tiers
    say("\n### Reload time per tier (larger model)\n\n| tier | s |\n|---|---|")
    say(f"| disk (first load) | {ld['seconds']:.2f} |")
    runner.unload("large")
    if cuda:
        cached = PipelineRunner(a.device, store, host_cache_bytes=64 << 30)
        first = timed_load(cached, "large", large, dtype)
        cached.unload("large")  # -> host RAM
        host = timed_load(cached, "large", large, dtype)
        say(f"| disk (again, page cache warm) | {first['seconds']:.2f} |")
        say(f"| host RAM ({host['tier']}) | {host['seconds']:.2f} |")
        cached.unload("large")
    else:
        again = timed_load(runner, "large", large, dtype)
        say(f"| {again['tier']} (reload) | {again['seconds']:.2f} |")
        say(f"| host RAM | {NEEDS_CUDA} (CPU workers keep no host cache) |")
        runner.unload("large")

    # 5. NVML
    say("\n### NVML\n")
    if not cuda:
        say(f"{NEEDS_CUDA}.")
    else:
        stats = nvml_stats({"w0": a.device})
        if not stats:
            say("pynvml not installed or no driver answered (`pip install nvidia-ml-py`): the server's GPU gauges "
                "would be absent too.")
        else:
            s = stats["w0"]
            extra = ""
            try:
                import pynvml

                h = pynvml.nvmlDeviceGetHandleByIndex(int(a.device.split(":")[1]))
                extra = (f", power {pynvml.nvmlDeviceGetPowerUsage(h) / 1000:.0f} W, "
                         f"{pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)} °C")
            except Exception as e:  # noqa: BLE001 - optional extras
                extra = f" (power/temperature unavailable: {type(e).__name__})"
            say(f"utilization {s['utilization']:.2f}, memory used {s['memory_used'] / MIB:.0f} / "
                f"{s['memory_total'] / MIB:.0f} MiB{extra} (the values `/metrics` exports per worker)")

    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
