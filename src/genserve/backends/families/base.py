"""What a model family is (``Traits``: pure data, readable from config files alone) and how it is
driven (``FamilyAdapter``: builds pipeline calls in the worker).

Traits are what the server validates requests against before any weights are loaded; the adapter
is what the worker uses to turn a batch of jobs into pipeline calls whose outputs equal what each
job would get alone. Neither imports torch at module level: the server imports this package.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Configs = Mapping[str, Mapping[str, Any]]  # component name -> its config.json ("_pipeline": model_index.json)

MAX_SEQUENCE_LENGTH = 512  # the most any supported text encoder path accepts (FLUX, SD3 refuse more)


class UnsupportedPipeline(ValueError):
    """The pipeline cannot be served by genserve (a required input it cannot supply, a kind mismatch)."""


@dataclass(frozen=True)
class Traits:
    """What a family honours and produces. ``negative``: "cfg" = a negative prompt is used when
    guidance > 1 (classifier-free guidance), "true_cfg" = when the model's true_cfg_scale > 1,
    "none" = never. ``guidance``: "cfg" (> 1 turns CFG on), "embedded" (an input of the denoiser,
    honoured at any value), "none" (ignored)."""

    family: str
    pipeline: str
    kind: str  # image | video
    size_multiple: int
    frame_multiple: int = 0  # video: num_frames - 1 must be a multiple of this (the VAE's temporal factor)
    max_side: int = 0  # largest width/height the positional embedding covers (0: no limit known)
    negative: str = "cfg"
    guidance: str = "cfg"
    true_cfg: bool = False  # takes true_cfg_scale
    max_sequence_length: int = 0  # 0: not a knob of this family; else its default
    image_input: bool = False  # needs one conditioning image per pipeline call
    edit: bool = False  # takes an init image (image-to-image) and a mask (inpainting); one per job
    # True when a job *having* a negative prompt changes what its batch-mates without one get
    # (SDXL's force_zeros_for_empty_prompt, FLUX's batch-wide true-CFG switch): the presence of a
    # negative prompt is then part of the batch key.
    negative_in_key: bool = False

    def negative_honoured(self, guidance: float, true_cfg_scale: float | None) -> bool:
        if self.negative == "cfg":
            return guidance > 1.0
        if self.negative == "true_cfg":
            return (true_cfg_scale or 1.0) > 1.0
        return False

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def image_digest(image: str | None) -> str:
    return hashlib.sha256(image.encode()).hexdigest()[:16] if image else ""


def call_variant(traits: Traits | None, negative_prompt: str | None, image_sha256: str | None = None,
                 task: str = "text", strength: float | None = None) -> str:
    """What, besides the batch key's shape, must be equal for jobs to share one pipeline call.
    Unknown families split on the presence of a negative prompt: it costs batching, never results.
    The task picks the pipeline (text, img2img, inpaint, ...) and the strength how many of the
    steps run, so both split calls; a per-job init image does not (img2img and inpainting take a
    list), but a conditioning image does (image-to-video takes one per call)."""
    parts = []
    if (traits is None or traits.negative_in_key) and negative_prompt is not None:
        parts.append("neg")
    if task in ("img2img", "inpaint"):
        parts.append(f"{task}:s{strength:g}")
    elif image_sha256:
        parts.append("img:" + image_sha256[:16])  # one conditioning image per call
    return "+".join(parts)


def block_out(cfg: Mapping[str, Any] | None) -> list[int]:
    return [int(c) for c in (cfg or {}).get("block_out_channels") or []]


def kl_scale(vae: Mapping[str, Any] | None, default: int = 8) -> int:
    """Spatial scale of an AutoencoderKL: one 2x downsample per block but the last."""
    chans = block_out(vae)
    return 2 ** (len(chans) - 1) if chans else default


@dataclass
class Options:
    """Model-level knobs from the config that change the pipeline call."""

    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "Options":
        return cls(spec.get("true_cfg_scale"), spec.get("max_sequence_length"))


class FamilyAdapter:
    """Drives one family's pipeline. Subclasses override the hooks; the step-level runner (issue
    13) adds ``encode_prompt`` / ``prepare_latents`` / ``denoise_step`` hooks beside these.

    - ``inputs_supplied``: the ``__call__`` parameters genserve fills in;
    - ``group_key(job)``: jobs with different keys never share a call (mirrors the batch key's
      variant, so a mixed batch from an older server is still run correctly);
    - ``call_kwargs(jobs, params)``: the per-call arguments (the runner adds generators, the step
      callback and output_type);
    - ``working_bytes(...)``: an estimate of a batch's peak working memory (a hint, never a
      measurement)."""

    family = "generic"
    inputs_supplied = frozenset({"prompt"})
    # Whether the worker must refuse inputs this pipeline would ignore: only where the server could
    # not (a family it does not know). A known family's requests were checked at submit; a job
    # retried on a fallback model of another family gets what that model honours.
    checks_inputs = False

    def __init__(self, traits: Traits, configs: Configs, options: Options) -> None:
        self.traits, self.configs, self.options = traits, configs, options

    # ---- batching -----------------------------------------------------------------------------------

    def group_key(self, job: Mapping[str, Any]) -> str:
        sha = job.get("image_sha256") or (image_digest(job["image"]) if job.get("image") else None)
        return call_variant(self.traits, job.get("negative_prompt"), sha, job.get("task") or "text",
                            job.get("strength"))

    def pipeline(self, pipe: Any, task: str) -> Any:
        """The pipeline that runs ``task`` (img2img and inpaint: one built over the same components)."""
        return pipe

    def call_kwargs(self, jobs: list[Mapping[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {"prompt": [j["prompt"] for j in jobs], "width": params["width"],
                              "height": params["height"], "num_inference_steps": params["steps"]}
        if self.traits.guidance != "none":
            kw["guidance_scale"] = params["guidance"]
        negs = [j.get("negative_prompt") for j in jobs]
        if self.traits.negative != "none" and any(n is not None for n in negs):
            # Within one call either every job has one or (families where None ≡ "") the rest get "".
            kw["negative_prompt"] = [n or "" for n in negs]
        if self.traits.true_cfg and self.options.true_cfg_scale is not None:
            kw["true_cfg_scale"] = self.options.true_cfg_scale
        if self.traits.max_sequence_length and self.options.max_sequence_length is not None:
            kw["max_sequence_length"] = self.options.max_sequence_length
        if self.traits.kind == "video":
            kw["num_frames"] = params["num_frames"]
        return kw

    def text_path(self) -> Any:
        """How this family's texts are encoded for the worker's prompt-embedding cache (a
        ``backends.prompt_cache.TextPath``), or None: the pipeline encodes its prompts itself."""
        return None

    def step_driver(self, pipe: Any) -> Any:
        """How to drive this family's pipeline one denoising step at a time for step-level batching
        (a ``backends.stepping.StepFamily``), or None: it keeps request-level calls."""
        return None

    def ignored_inputs(self, job: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
        """Fields of ``job`` this pipeline would silently ignore. The server refuses them at submit
        when it knows the family; for a model it could not read there, the worker refuses them."""
        t, out = self.traits, []
        if job.get("image") and not (t.image_input or t.edit):
            out.append("image")
        honoured = t.negative_honoured(params["guidance"], self.options.true_cfg_scale)
        if job.get("negative_prompt") is not None and not honoured:
            out.append("negative_prompt")
        return out

    # ---- memory -------------------------------------------------------------------------------------

    def working_phases(self, n: int, width: int, height: int, frames: int, guidance: float,
                       dtype_bytes: int) -> dict[str, int]:
        """Peak working bytes of each phase: ``denoiser`` (one step), ``vae`` (decode) and the
        decoded ``output``. The phases run one after another; the output outlives the decode."""
        from .memory import generic_phases

        return generic_phases(self.configs, n, width, height, frames, guidance, dtype_bytes)

    def working_bytes(self, n: int, width: int, height: int, frames: int, guidance: float, dtype_bytes: int) -> int:
        ph = self.working_phases(n, width, height, frames, guidance, dtype_bytes)
        return max(ph["denoiser"], ph["vae"]) + ph["output"]
