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


class ImageGenerationRequest(BaseModel):
    """OpenAI Images API body. Fields we do not use (quality, style, user, …) are accepted and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)
    prompt: Text
    model: Text | None = None
    n: int = 1
    size: Text | None = Field(default=None, max_length=32)
    response_format: Literal["url", "b64_json"] = "url"


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    worker: Text | None = Field(default=None, max_length=256, description="a worker id; default: wherever it fits")
