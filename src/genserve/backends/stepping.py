"""Step-level batching: requests join and leave a running set at denoising-step boundaries.

A ``RunningSet`` drives one loaded pipeline one denoising step at a time. Each request (a
``Slot``) keeps everything that makes its result its own: its latents, its own copy of the
pipeline's scheduler (diffusers schedulers are stateful — step index, sigma schedule, multistep
history — so one shared scheduler cannot serve requests at different steps), its step count,
guidance, prompt embeddings and random generator. One step runs ONE denoiser call over every row
of the set with per-row timesteps, then applies classifier-free guidance and the scheduler update
per request. A request whose last step is done leaves the set (the caller decodes and writes it)
while the others go on; a request can be dropped (cancel) or taken out with its latents
(pause) and put back later, continuing where it stopped.

How a family's pipeline is driven lives in a ``StepFamily``: the SD-family UNet pipelines
(``UNetFamily``: StableDiffusionPipeline and look-alikes) and the Wan flow-matching transformer
(``WanFamily``). Each family adapter says which one drives its pipeline
(``FamilyAdapter.step_driver``; backends/families), or None: it keeps request-level batching.

Equivalence: a request's output equals its standalone ``pipe(...)`` output with the same seed up
to floating-point reassociation in batched kernels (tests/backends/test_stepping.py states the
tolerance), whatever joins or leaves around it, because every operation is per row except the
denoiser call itself, and the denoiser treats rows independently.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class StepJob:
    """What one request brings to the set. ``negative_prompt`` None means none (the family's own
    default applies, as in a standalone call)."""

    id: str
    prompt: str
    seed: int
    steps: int
    guidance: float
    negative_prompt: str | None = None
    loras: tuple = ()  # its LoRA adapters, (Adapter, scale) each (backends/lora_apply.py)


@dataclass
class Slot:
    """One request in (or paused out of) a running set."""

    job: StepJob
    latents: Any
    scheduler: Any
    timesteps: Any
    cond: Any  # prompt embeddings, one row
    uncond: Any | None  # negative embeddings when classifier-free guidance applies, else None
    generator: Any
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    done: int = 0  # denoising steps completed
    joined_at: int = 0  # the set's step counter when this request joined
    paused_at: list[int] = field(default_factory=list)  # its own step count at each pause (resumed from there)
    prompt_cache: str | None = None  # "hit" | "miss" in the worker's prompt-embedding cache; None: off

    @property
    def finished(self) -> bool:
        return self.done >= len(self.timesteps)

    @property
    def rows(self) -> int:
        return 2 if self.uncond is not None else 1


class StepFamily(Protocol):
    def prepare(self, pipe, jobs: list[StepJob], shape: dict[str, int], device) -> list[Slot]: ...
    def denoise(self, pipe, slots: list[Slot]) -> list[Any]: ...
    def decode(self, pipe, slots: list[Slot]) -> list[Any]: ...


def _own_scheduler(pipe, steps: int, device) -> tuple[Any, Any]:
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps, device=device)
    return sched, sched.timesteps


def _step_kwargs(sched, generator) -> dict[str, Any]:
    # As the pipelines' prepare_extra_step_kwargs: pass the request's own generator (eta stays 0).
    params = inspect.signature(sched.step).parameters
    return {"generator": generator} if "generator" in params else {}


def _generator(seed: int):
    import torch

    return torch.Generator(device="cpu").manual_seed(seed)


def _negatives(jobs: list[StepJob], cfg: bool) -> list[str] | None:
    # None means none: the pipelines then encode "" for the unconditional rows, as spelled here
    return [j.negative_prompt or "" for j in jobs] if cfg else None


def _slots(pipe, jobs: list[StepJob], device, latents, cond, uncond, gens, cached: list[str | None]) -> list[Slot]:
    """One slot per job from rows prepared together (rows are independent in the text encoder, as in
    the denoiser; each job's latents come from its own generator, as in a standalone call). A job
    without guidance drops the unconditional row another job in the group needed. Rows are copied out,
    so that a slot kept after the others left (paused, parked) holds only its own tensors."""
    out = []
    for i, (job, gen) in enumerate(zip(jobs, gens)):
        sched, timesteps = _own_scheduler(pipe, job.steps, device)
        neg = uncond[i:i + 1].clone() if job.guidance > 1.0 else None
        out.append(Slot(job, latents[i:i + 1].clone(), sched, timesteps, cond[i:i + 1].clone(), neg, gen,
                        _step_kwargs(sched, [gen]), prompt_cache=cached[i]))
    return out


def _guided(pred, slots: list[Slot]) -> list[Any]:
    """Split the denoiser's rows back per request and apply each one's guidance. Rows are laid out
    slot by slot: [cond] or [cond, uncond]."""
    out, r = [], 0
    for s in slots:
        cond = pred[r:r + 1]
        if s.uncond is not None:
            uncond = pred[r + 1:r + 2]
            cond = uncond + s.job.guidance * (cond - uncond)
        out.append(cond)
        r += s.rows
    return out


class _Texts:
    """Prompt encoding for a family: the pipeline's own, or through the worker's prompt-embedding
    cache when the step runner gives the family an ``embedder`` (backends/prompt_cache.py)."""

    embedder: Any = None

    def texts(self, pipe, jobs: list[StepJob], cfg: bool, device, plain) -> tuple[Any, Any, list[str | None]]:
        if self.embedder is None:
            return (*plain(), [None] * len(jobs))
        rows = [{"prompt": j.prompt, "negative_prompt": j.negative_prompt} for j in jobs]
        return self.embedder.job_rows(pipe, rows, cfg, device)


class UNetFamily(_Texts):
    """StableDiffusionPipeline-style: CLIP text encoder, UNet2DConditionModel, AutoencoderKL, a
    scheduler with ``scale_model_input`` (guidance as CFG when > 1)."""

    def prepare(self, pipe, jobs: list[StepJob], shape: dict[str, int], device) -> list[Slot]:
        import torch

        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError("guidance-embedded UNets (LCM-style) are not step-batched yet")
        cfg = any(j.guidance > 1.0 for j in jobs)
        with torch.inference_mode():
            cond, uncond, cached = self.texts(pipe, jobs, cfg, device, lambda: pipe.encode_prompt(
                [j.prompt for j in jobs], device, 1, cfg, _negatives(jobs, cfg)))
            gens = [_generator(j.seed) for j in jobs]
            latents = pipe.prepare_latents(len(jobs), pipe.unet.config.in_channels, shape["height"], shape["width"],
                                           cond.dtype, device, gens, None)
        return _slots(pipe, jobs, device, latents, cond, uncond, gens, cached)

    def denoise(self, pipe, slots: list[Slot]) -> list[Any]:
        import torch

        xs, ts, embs = [], [], []
        for s in slots:
            t = s.timesteps[s.done]
            x = s.latents
            if hasattr(s.scheduler, "scale_model_input"):
                x = s.scheduler.scale_model_input(torch.cat([x] * s.rows), t)
            else:
                x = torch.cat([x] * s.rows)
            xs.append(x)
            ts.extend([t] * s.rows)
            embs.append(s.cond)
            if s.uncond is not None:
                embs.append(s.uncond)
        pred = pipe.unet(torch.cat(xs), torch.stack([torch.as_tensor(t) for t in ts]).to(xs[0].device),
                         encoder_hidden_states=torch.cat(embs), return_dict=False)[0]
        return _guided(pred, slots)

    def decode(self, pipe, slots: list[Slot]) -> list[Any]:
        import torch

        latents = torch.cat([s.latents for s in slots])
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type="pil", do_denormalize=[True] * len(slots))


class WanFamily(_Texts):
    """WanPipeline (text-to-video): UMT5 text encoder, WanTransformer3DModel over patched latents,
    flow-matching scheduler, AutoencoderKLWan decoding frames causally."""

    def __init__(self, max_sequence_length: int = 512) -> None:
        self.max_sequence_length = max_sequence_length  # as the pipeline's __call__ default

    def prepare(self, pipe, jobs: list[StepJob], shape: dict[str, int], device) -> list[Slot]:
        import torch

        cfg = any(j.guidance > 1.0 for j in jobs)
        dtype = pipe.transformer.dtype
        with torch.inference_mode():
            cond, uncond, cached = self.texts(pipe, jobs, cfg, device, lambda: pipe.encode_prompt(
                [j.prompt for j in jobs], _negatives(jobs, cfg), cfg, 1, device=device,
                max_sequence_length=self.max_sequence_length))
            gens = [_generator(j.seed) for j in jobs]
            latents = pipe.prepare_latents(len(jobs), pipe.transformer.config.in_channels, shape["height"],
                                           shape["width"], shape["num_frames"], torch.float32, device, gens, None)
        return _slots(pipe, jobs, device, latents, cond.to(dtype), uncond.to(dtype) if cfg else None, gens, cached)

    def denoise(self, pipe, slots: list[Slot]) -> list[Any]:
        import torch

        dtype = pipe.transformer.dtype
        xs, ts, embs = [], [], []
        for s in slots:
            t = s.timesteps[s.done]
            xs.append(torch.cat([s.latents.to(dtype)] * s.rows))
            ts.extend([t] * s.rows)
            embs.append(s.cond)
            if s.uncond is not None:
                embs.append(s.uncond)
        pred = pipe.transformer(hidden_states=torch.cat(xs), timestep=torch.stack(ts).to(xs[0].device),
                                encoder_hidden_states=torch.cat(embs), return_dict=False)[0]
        return _guided(pred, slots)

    def decode(self, pipe, slots: list[Slot]) -> list[Any]:
        import torch

        vae = pipe.vae
        latents = torch.cat([s.latents for s in slots]).to(vae.device, dtype=vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return list(pipe.video_processor.postprocess_video(video, output_type="np"))


class RunningSet:
    """The requests of one batch key (model, size, frames) on one worker, stepped together."""

    def __init__(self, pipe, family: StepFamily, shape: dict[str, int], max_size: int) -> None:
        self.pipe = pipe
        self.family = family
        self.shape = shape
        self.max_size = max_size
        self.slots: dict[str, Slot] = {}
        self.steps_run = 0  # denoiser calls so far
        self.shared: dict[str, set[str]] = {}  # job id -> ids of the jobs it shared a step with
        self.device = pipe._execution_device  # looked up once: it walks every module of the pipeline
        # LoRA: ``lora_plan(jobs, rows)`` -> a context applying each row's adapters (LoraHooks.plan);
        # None: no adapters in this set.
        self.lora_plan = None

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def full(self) -> bool:
        return len(self.slots) >= self.max_size

    def admit(self, job: StepJob) -> Slot:
        """Encode the prompt and set up the latents (between steps). The caller checks ``full``."""
        return self.admit_many([job])[0]

    def admit_many(self, jobs: list[StepJob]) -> list[Slot]:
        """Admit the jobs joining at one step boundary, their prompts encoded in one call."""
        ids = [job.id for job in jobs]
        for job_id in ids:
            if job_id in self.slots or ids.count(job_id) > 1:
                raise ValueError(f"job {job_id} is already in the set")
        return [self.resume(slot) for slot in self.family.prepare(self.pipe, jobs, self.shape, self.device)] if jobs else []

    def resume(self, slot: Slot) -> Slot:
        """Put a paused slot (or a freshly prepared one) into the set; it continues at its own step."""
        slot.joined_at = self.steps_run if slot.done == 0 else slot.joined_at
        self.slots[slot.job.id] = slot
        self.shared.setdefault(slot.job.id, set())
        return slot

    def drop(self, job_id: str) -> Slot | None:
        """Take a request out (cancel, or pause: the returned slot keeps its latents and step)."""
        return self.slots.pop(job_id, None)

    def step(self) -> list[Slot]:
        """One denoising step for every request in the set. Returns those that finished; they
        have left the set and are ready to decode."""
        import torch

        if not self.slots:
            return []
        slots = list(self.slots.values())
        loras = [s.job.loras for s in slots]
        with torch.inference_mode(), self._adapters(slots, loras):
            preds = self.family.denoise(self.pipe, slots)
            for s, pred in zip(slots, preds):
                t = s.timesteps[s.done]
                s.latents = s.scheduler.step(pred, t, s.latents, **s.step_kwargs, return_dict=False)[0]
                s.done += 1
        if len(slots) > 1:
            ids = {s.job.id for s in slots}
            for s in slots:
                self.shared[s.job.id] |= ids - {s.job.id}
        self.steps_run += 1
        finished = [s for s in slots if s.finished]
        for s in finished:
            del self.slots[s.job.id]
        return finished

    def _adapters(self, slots: list[Slot], loras: list[tuple]):
        """Each slot's adapters on its own rows (laid out slot by slot: [cond] or [cond, uncond])."""
        import contextlib

        if self.lora_plan is None or not any(loras):
            return contextlib.nullcontext()
        return self.lora_plan(loras, [i for i, s in enumerate(slots) for _ in range(s.rows)])

    def decode(self, slots: list[Slot]) -> list[Any]:
        """The outputs of requests that finished at the same step, decoded in one VAE call (rows are
        independent in the decoder, as in the denoiser)."""
        import torch

        with torch.inference_mode():
            return self.family.decode(self.pipe, slots) if slots else []
