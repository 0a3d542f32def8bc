"""Request bodies of the HTTP API, type-checked strictly at the edge.

Strict: a number must be a JSON number and a string a JSON string — ``"64"`` and ``true`` are not
widths (pydantic's lax mode would coerce both). Text must be valid Unicode: JSON can spell a lone
surrogate (``"\\ud800"``), which Python decodes but cannot encode again, so a prompt like that would
be stored and then break every read of the job and the batch that runs it; it is refused with a 400
before anything is stored. Lists are bounded, so no body makes the server build a huge object.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _valid_unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"is not valid Unicode (a lone surrogate at character {e.start})") from None
    return s


# Every free-text field of a request.
Text = Annotated[str, AfterValidator(_valid_unicode)]

WebhookEvent = Literal["started", "progress", "completed"]


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text
    prompt: Text
    negative_prompt: Text | None = None
    image: Text | None = Field(default=None, description="image-to-video: the conditioning frame, a "
                               "data:image/png|jpeg;base64 URL (raise [http] max_body_bytes for large images)")
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
