"""Validation of a generation request against a model's limits. Pure: no I/O, no framework types."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..backends.families import Traits, call_variant
from ..backends.families import speed as levers
from ..backends.image_input import ImageInputError, InputImage, check_input, split_data_url
from ..config.load import ModelConfig
from ..engine.types import BatchKey, Priority

PRIORITIES = tuple(p.name.lower() for p in Priority)
WEBHOOK_EVENTS = ("started", "progress", "completed")
OUTPUT_FORMATS = ("png", "jpeg", "webp")  # backends/encode.py: IMAGE_FORMATS
DEFAULT_COMPRESSION = 90  # jpeg / webp quality when output_compression is absent
# text: prompt only; img2img: an init image (image models); inpaint: an init image and a mask;
# i2v: a conditioning frame (image-to-video models); cond: a conditioning image some other
# pipeline requires (an image model of an unknown family).
TASKS = ("text", "img2img", "inpaint", "i2v", "cond")
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    def __init__(self, field: str, message: str, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status, self.code = field, message, status, code


@dataclass(frozen=True)
class JobParams:
    """A validated request, normalized (defaults filled in)."""

    model: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_frames: int
    steps: int
    guidance: float
    seed: int
    priority: str
    # Defaults keep records written before these fields existed loadable.
    timeout_s: float | None = None  # None: the model's
    webhook: str | None = None
    webhook_events: tuple[str, ...] = ("completed",)
    # The input image / mask: a result-store key (``<job id>/input-image.png``) once the server has
    # stored it (a data URL in records written before inputs were stored), with its digest.
    image: str | None = None
    variant: str = ""  # the batch key's variant (backends/families/base.py: call_variant)
    task: str = "text"
    strength: float | None = None  # img2img / inpaint: how much of the init image is re-noised
    image_sha256: str | None = None
    mask: str | None = None
    mask_sha256: str | None = None
    # How the worker encodes an image job's output; not part of the batch key (encoding is per job).
    output_format: str | None = None  # png | jpeg | webp; None: a video job (MP4), or a record from before: png
    output_compression: int | None = None  # jpeg / webp quality 0..100; None for png and videos
    cache: dict[str, Any] | None = None  # the step cache (normalized; docs/performance.md); part of the batch key
    # LoRA adapters (docs/lora.md): (name, scale, id) each, id = the registered file's digest;
    # lora_key: the adapter set where the model splits batches by it ("" where adapters mix).
    loras: tuple[tuple[str, float, str], ...] = ()
    lora_key: str = ""

    @property
    def key(self) -> BatchKey:
        return BatchKey(self.model, self.width, self.height, self.num_frames, self.steps, self.guidance, self.variant,
                        levers.label(self.cache), self.lora_key)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, webhook_events=list(self.webhook_events),
                    loras=[{"name": n, "scale": s, "id": i} for n, s, i in self.loras])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobParams":
        return cls(**dict(d, webhook_events=tuple(d.get("webhook_events", ("completed",))),
                          loras=tuple((a["name"], a["scale"], a["id"]) for a in d.get("loras") or ())))


def validate(body: dict[str, Any], models: dict[str, ModelConfig], *, random_seed: int,
             webhooks_enabled: bool = True) -> JobParams:
    """``body`` has already been type-checked by the API layer; here the model's limits apply."""
    name = body.get("model")
    if name not in models:
        raise RequestError("model", f"unknown model {name!r}; available: {', '.join(sorted(models))}")
    m = models[name]
    prompt = body.get("prompt")
    if prompt is None or not str(prompt).strip():
        raise RequestError("prompt", "must not be empty")
    if len(prompt) > m.max_prompt_chars:
        raise RequestError("prompt", f"is {len(prompt)} characters; the limit is {m.max_prompt_chars}")
    neg = body.get("negative_prompt")
    if neg is not None and len(neg) > m.max_prompt_chars:
        raise RequestError("negative_prompt", f"is {len(neg)} characters; the limit is {m.max_prompt_chars}")
    # Only an absent size takes the default: 0 is an invalid size, not a request for the default.
    width = m.default_size[0] if body.get("width") is None else body["width"]
    height = m.default_size[1] if body.get("height") is None else body["height"]
    traits = m.family.traits
    for fname, v in (("width", width), ("height", height)):
        if v <= 0:
            raise RequestError(fname, "must be positive")
        if v % m.size_multiple:
            why = f" ({traits.family} models need it)" if traits and traits.size_multiple == m.size_multiple else ""
            raise RequestError(fname, f"{v} is not a multiple of {m.size_multiple}{why}")
        if traits and traits.max_side and v > traits.max_side:
            raise RequestError(fname, f"{v} exceeds {traits.max_side}, the largest side {name}'s positional "
                                      "embedding covers")
    if not m.size_allowed(width, height):
        if m.sizes:
            allowed = ", ".join(f"{w}x{h}" for w, h in m.sizes)
            raise RequestError("size", f"{width}x{height} is not allowed for {name}; allowed: {allowed}")
        raise RequestError("size", f"{width}x{height} = {width * height} pixels exceeds the limit of {m.max_pixels}")
    frames = body.get("num_frames")
    if m.kind == "image":
        if frames is not None:
            raise RequestError("num_frames", f"{name} is an image model; num_frames is only for video models")
        frames = 0
    else:
        frames = m.default_frames if frames is None else frames
        if not 1 <= frames <= m.max_frames:
            raise RequestError("num_frames", f"must be between 1 and {m.max_frames}")
        if (frames - 1) % m.frame_stride:
            raise RequestError("num_frames", f"num_frames - 1 must be a multiple of {m.frame_stride} (e.g. {1 + m.frame_stride * max(1, (frames - 1) // m.frame_stride)})")
    steps = body.get("steps")
    steps = m.default_steps if steps is None else steps
    if not 1 <= steps <= m.max_steps:
        raise RequestError("steps", f"must be between 1 and {m.max_steps}")
    guidance = body.get("guidance")
    if guidance is not None and traits and traits.guidance == "none":
        raise RequestError("guidance", f"{name} ({traits.family}, {traits.pipeline}) has no guidance input; "
                                       "it would be ignored")
    guidance = m.default_guidance if guidance is None else float(guidance)
    if not 0.0 <= guidance <= 50.0:
        raise RequestError("guidance", "must be between 0 and 50")
    if neg is not None and traits and not traits.negative_honoured(guidance, m.family.true_cfg_scale):
        raise RequestError("negative_prompt", _negative_ignored(name, traits, guidance))
    image, mask = _input(body.get("image"), "image"), _input(body.get("mask"), "mask")
    task, strength = _task(image, mask, body.get("strength"), m, traits)
    if strength is not None and int(steps * strength) < 1:
        raise RequestError("strength", f"{strength:g} x {steps} steps leaves no denoising step; raise steps or "
                                       "strength")
    seed = body.get("seed")
    seed = random_seed if seed is None else seed
    if not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", f"must be between 0 and {MAX_SEED}")
    priority = body.get("priority") or "standard"
    if priority not in PRIORITIES:
        raise RequestError("priority", f"must be one of {', '.join(PRIORITIES)}")
    timeout_s = body.get("timeout_s")
    timeout_s = m.timeout_s if timeout_s is None else float(timeout_s)
    if not 0 < timeout_s <= m.timeout_s:
        raise RequestError("timeout_s", f"must be greater than 0 and at most {m.timeout_s:g} for {name}")
    webhook, events = body.get("webhook"), body.get("webhook_events")
    if webhook is not None:
        if not webhooks_enabled:
            raise RequestError("webhook", "webhooks are not enabled on this server (server.webhook_secret)")
        try:
            url = urlsplit(webhook)
            url.port  # noqa: B018 — raises on a port that is not a number in 0..65535
        except ValueError:
            raise RequestError("webhook", "is not a valid URL") from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise RequestError("webhook", "must be an http:// or https:// URL")
        if url.username is not None or url.password is not None:
            raise RequestError("webhook", "must not carry credentials (user:password@)")
    elif events is not None:
        raise RequestError("webhook_events", "requires webhook")
    events = ("completed",) if events is None else tuple(dict.fromkeys(events))
    bad = [e for e in events if e not in WEBHOOK_EVENTS]
    if bad or not events:
        raise RequestError("webhook_events", f"must be a non-empty list of {', '.join(WEBHOOK_EVENTS)}")
    fmt, compression = _output_format(body, name, m.kind)
    cache = _cache(body.get("cache"), m, traits)
    image_sha, mask_sha = (x.sha256 if x else None for x in (image, mask))
    loras = _loras(body.get("loras"), m)
    return JobParams(name, prompt, neg, width, height, frames, steps, guidance, seed, priority, timeout_s, webhook,
                     events, variant=call_variant(traits, neg, image_sha, task, strength), task=task,
                     strength=strength, image_sha256=image_sha, mask_sha256=mask_sha,  # image/mask: stored later
                     output_format=fmt, output_compression=compression, cache=cache,
                     loras=loras, lora_key=lora_key(loras) if loras and lora_batching(m) == "split" else "")


def _cache(raw: Any, m: ModelConfig, traits: Traits | None) -> dict[str, Any] | None:
    """The request's step cache, normalized (absent: the model's ``default_cache``)."""
    if raw is None:
        return m.family.default_cache
    try:
        return levers.normalize(raw, traits.family if traits else None, m.family.caches)
    except levers.CacheError as e:
        raise RequestError(e.field, e.message) from None


MAX_LORA_SCALE = 4.0
# Families whose every denoiser call keeps a job's rows at ``row % jobs`` (classifier-free guidance
# concatenates [uncond, cond] or runs a second call): adapters can be applied per row there.
MIXING_FAMILIES = ("sd", "sdxl", "sd3", "flux", "wan")


def lora_batching(m: ModelConfig) -> str:
    """``mixed`` where the family's rows can each get their own adapters, else ``split``."""
    traits = m.family.traits
    return m.lora_batching if traits is not None and traits.family in MIXING_FAMILIES else "split"


def lora_key(loras: tuple[tuple[str, float, str], ...]) -> str:
    return "+".join(sorted(f"{i}@{s:g}" for _, s, i in loras))


def _loras(value: Any, m: ModelConfig) -> tuple[tuple[str, float, str], ...]:
    """The job's adapters: each entry ``{"name", "scale", "lora"}`` where ``lora`` is the registered
    adapter the caller's tenant sees under that name (None: none), resolved by the API layer."""
    if not value:
        return ()
    if len(value) > m.max_loras:
        raise RequestError("loras", f"at most {m.max_loras} adapters per job for {m.name}")
    out: list[tuple[str, float, str]] = []
    for i, entry in enumerate(value):
        name, scale, lora = entry["name"], entry.get("scale", 1.0), entry.get("lora")
        if lora is None:
            raise RequestError(f"loras[{i}].name", f"no adapter {name!r} (GET /v1/loras lists those you may use)")
        if lora["model"] != m.name:
            raise RequestError(f"loras[{i}].name", f"{name!r} was made for {lora['model']}, not {m.name}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
            raise RequestError(f"loras[{i}].scale", f"must be a number between -{MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}")
        if any(n == name for n, _, _ in out):
            raise RequestError(f"loras[{i}].name", f"{name!r} is listed twice")
        out.append((name, float(scale), lora["id"]))
    return tuple(out)


def _output_format(body: dict[str, Any], name: str, kind: str) -> tuple[str | None, int | None]:
    """``output_format`` and ``output_compression``, normalized: image jobs get a format (png by
    default) and jpeg / webp a quality; videos are MP4, so neither field applies to them."""
    fmt, compression = body.get("output_format"), body.get("output_compression")
    if kind != "image":
        for field in ("output_format", "output_compression"):
            if body.get(field) is not None:
                raise RequestError(field, f"{name} is a {kind} model; {field} is for image models (videos are MP4)")
        return None, None
    fmt = "png" if fmt is None else fmt
    if fmt not in OUTPUT_FORMATS:
        raise RequestError("output_format", f"must be one of {', '.join(OUTPUT_FORMATS)}")
    if compression is None:
        return fmt, None if fmt == "png" else DEFAULT_COMPRESSION
    if fmt == "png":
        raise RequestError("output_compression", "applies to jpeg and webp only (png is lossless)")
    if isinstance(compression, bool) or not isinstance(compression, int) or not 0 <= compression <= 100:
        raise RequestError("output_compression", "must be an integer between 0 and 100")
    return fmt, compression


def _negative_ignored(name: str, traits: Traits, guidance: float) -> str:
    if traits.negative == "cfg":
        return (f"{name} uses a negative prompt only with classifier-free guidance (guidance > 1); "
                f"this request has guidance {guidance:g}, so it would be ignored")
    if traits.negative == "true_cfg":
        return (f"{name} ({traits.family}) ignores negative prompts unless the model is configured with "
                "true_cfg_scale > 1")
    return f"{name} ({traits.family}) does not take a negative prompt"


def _input(value: Any, field: str) -> InputImage | None:
    """An input already read by the server (InputImage), or a data URL (decoded here)."""
    if value is None or isinstance(value, InputImage):
        return value
    try:
        mime, data = split_data_url(value)
        return check_input(data, mask=field == "mask", declared=mime)
    except ImageInputError as e:
        raise RequestError(field, str(e)) from None


def _task(image: InputImage | None, mask: InputImage | None, strength: Any, m: ModelConfig,
          traits: Traits | None) -> tuple[str, float | None]:
    """What the job does with its inputs, and its strength (img2img / inpaint only)."""
    name, family = m.name, f"{traits.family}, {traits.pipeline}" if traits else "family unknown"
    if strength is not None and (image is None or m.kind != "image" or (traits and traits.image_input)):
        raise RequestError("strength", "is only for image-to-image and inpainting (an image model with image)")
    if mask is not None and m.kind != "image":
        raise RequestError("mask", f"{name} is a {m.kind} model; mask is only for inpainting on image models")
    if mask is not None and image is None:
        raise RequestError("mask", "requires image (the image to inpaint)")
    if image is None:
        if traits and traits.image_input:
            raise RequestError("image", f"is required: {name} ({family}) generates from a conditioning image")
        return "text", None
    if traits and traits.image_input:
        return ("i2v" if m.kind == "video" else "cond"), None
    if m.kind != "image" or not (traits and traits.edit):
        what = "conditioning image" if m.kind == "video" else "init image (image-to-image, inpainting)"
        raise RequestError("image", f"{name} ({family}) does not take a {what}")
    task = "img2img" if mask is None else "inpaint"
    if mask is not None and mask.size != image.size:
        raise RequestError("mask", f"is {mask.width}x{mask.height}; it must be the image's size, "
                                   f"{image.width}x{image.height}")
    strength = DEFAULT_STRENGTH[task] if strength is None else float(strength)
    if not 0.0 < strength <= 1.0:
        raise RequestError("strength", "must be greater than 0 and at most 1")
    return task, strength
