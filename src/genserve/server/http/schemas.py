"""Request bodies of the HTTP API, type-checked strictly at the edge.

Strict: a number must be a JSON number and a string a JSON string — ``"64"`` and ``true`` are not
widths (pydantic's lax mode would coerce both). Text must be valid Unicode: JSON can spell a lone
surrogate (``"\\ud800"``), which Python decodes but cannot encode again, so a prompt like that would
be stored and then break every read of the job and the batch that runs it; it is refused with a 400
before anything is stored. Lists are bounded, so no body makes the server build a huge object.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema


def _valid_unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"is not valid Unicode (a lone surrogate at character {e.start})") from None
    return s


# Every free-text field of a request.
Text = Annotated[str, AfterValidator(_valid_unicode)]

WebhookEvent = Literal["started", "progress", "completed"]


class ImageRef(BaseModel):
    """An earlier job's output as an input (the caller's own tenant's jobs only)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    job: Text = Field(min_length=1, max_length=128)
    index: int = Field(default=0, ge=0, le=1000)


def _image_input(v: Any) -> Any:
    """A data URL (text) or an ImageRef object; errors name the field itself, not a union member."""
    if isinstance(v, str):
        return _valid_unicode(v)
    if isinstance(v, dict):
        try:
            return ImageRef.model_validate(v).model_dump()
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where}: {err['msg']}" if where else err["msg"]) from None
    raise ValueError('must be a data URL (a string) or a job reference {"job": "<id>", "index": 0}')


ImageInput = Annotated[Any, AfterValidator(_image_input), WithJsonSchema({"anyOf": [
    {"type": "string", "description": "data:image/png|jpeg|webp;base64,..."},
    {"type": "object", "required": ["job"], "additionalProperties": False,
     "properties": {"job": {"type": "string", "minLength": 1, "maxLength": 128},
                    "index": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 0}}}]})]

_INPUT = ("a data:image/png|jpeg|webp;base64 URL, a multipart file part, or {\"job\": id, \"index\": 0} "
          "(an earlier job's output)")


class LoraRef(BaseModel):
    """A LoRA adapter for one job (docs/lora.md): a registered adapter's name and its scale."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Text = Field(min_length=1, max_length=64)
    scale: float = Field(default=1.0, description="-4..4; 1 = as trained")


LORAS_DOC = "LoRA adapters for this job, applied to the denoiser with their scales (docs/lora.md)"


def lora_refs(value: Any, field: str = "loras") -> list[dict[str, Any]] | None:
    """``loras`` from a JSON body (a list of {name, scale}) or a form field (that list as JSON
    text, or ``ink:0.8,paper``): each entry checked, errors naming ``loras[i].KEY``."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            try:
                value = json.loads(text)
            except ValueError:
                raise ValueError(f"{field}: is not valid JSON") from None
        else:
            value = []
            for item in text.split(","):
                name, _, scale = item.strip().partition(":")
                try:
                    value.append({"name": name, "scale": float(scale)} if scale else {"name": name})
                except ValueError:
                    raise ValueError(f"{field}[{len(value)}].scale: must be a number") from None
    if not isinstance(value, list) or len(value) > 16:
        raise ValueError(f"{field}: must be a list of at most 16 {{name, scale}} objects")
    out = []
    for i, v in enumerate(value):
        try:
            out.append(LoraRef.model_validate(v).model_dump())
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{field}[{i}]{'.' + where if where else ''}: {err['msg']}") from None
    return out


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text
    prompt: Text
    negative_prompt: Text | None = None
    image: ImageInput | None = Field(default=None, description="the init image (image models: image-to-image, "
                                          "inpainting) or conditioning frame (image-to-video models): " + _INPUT)
    mask: ImageInput | None = Field(default=None, description="inpainting (with image): white = repaint, "
                                         "black = keep; the image's size: " + _INPUT)
    strength: float | None = Field(default=None, description="image-to-image / inpainting: how much of the image "
                                   "is re-noised, in (0, 1] (default 0.8 image-to-image, 1.0 inpainting)")
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    priority: Literal["high", "standard", "low"] = "standard"
    id: Text | None = Field(default=None, min_length=1, max_length=128,
                            description="client-supplied id (idempotency key)")
    timeout_s: float | None = Field(default=None, description="deadline in seconds from submission (≤ the model's timeout_s)")
    webhook: Text | None = Field(default=None, max_length=2048, description="URL for signed job events (Standard Webhooks)")
    webhook_events: list[WebhookEvent] | None = Field(default=None, max_length=len(WebhookEvent.__args__),
                                                      description="requires webhook")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(default=None, description="image models: how "
                                                                 "the result is encoded (default png)")
    output_compression: int | None = Field(default=None, description="jpeg / webp quality, 0..100 (default 90)")
    cache: dict[str, Any] | None = Field(default=None, description='a step cache the model enables (its caches), '
                                         'e.g. {"method": "deep", "interval": 3} or {"method": "first_block", '
                                         '"threshold": 0.1}; default: the model\'s default_cache (docs/performance.md)')
    loras: list[LoraRef] | None = Field(default=None, max_length=16, description=LORAS_DOC)


OPENAI_QUALITIES = ("low", "medium", "high", "xhigh", "max", "auto", "standard", "hd")


class ImageGenerationRequest(BaseModel):
    """OpenAI Images API body (``images.generate``), plus genserve's own fields sent as the
    official client's ``extra_body``. OpenAI fields genserve cannot honour are accepted and
    ignored (listed, so a misspelled field is still a 400 rather than silently dropped)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: Text
    model: Text | None = None
    n: int | None = None
    size: Text | None = Field(default=None, max_length=32, description="WIDTHxHEIGHT or auto (the model's default)")
    response_format: Literal["url", "b64_json"] | None = None
    quality: Literal[OPENAI_QUALITIES] | None = Field(default=None, description="mapped to steps (docs/api.md)")
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = None
    # genserve's extensions (extra_body)
    seed: int | None = Field(default=None, description="image i of n gets seed + i")
    steps: int | None = None
    negative_prompt: Text | None = None
    guidance: float | None = None
    timeout_s: float | None = None
    priority: Literal["high", "standard", "low"] | None = None
    stream: bool | None = Field(default=None, description="true: Server-Sent Events, one image_generation.completed "
                                 "event per image")
    loras: list[LoraRef] | None = Field(default=None, max_length=16, description=LORAS_DOC)
    # OpenAI fields accepted and ignored
    background: Text | None = None
    moderation: Text | None = None
    style: Text | None = None
    user: Text | None = None
    safety_identifier: Text | None = None
    partial_images: int | None = None
    complexity: Text | None = None


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    worker: Text | None = Field(default=None, max_length=256, description="a worker id; default: wherever it fits")
