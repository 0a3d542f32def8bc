"""Output encoders: PNG, JPEG or WebP (Pillow) for images, H.264 MP4 (PyAV, faststart) for videos, small
JPEG thumbnails."""
from __future__ import annotations

import io
import os
import tempfile

import numpy as np

THUMBNAIL_MAX_SIDE = 256  # px, the longer side; smaller outputs keep their size (never upscaled)
THUMBNAIL_QUALITY = 80  # JPEG quality: a dashboard preview, ~5-15 KB at 256 px


def to_uint8_frames(frames) -> np.ndarray:
    """Pipeline video output (float [0,1] array, uint8 array or list of PIL images) -> uint8 (F,H,W,3)."""
    if isinstance(frames, list):
        frames = np.stack([np.asarray(f) for f in frames])
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return arr


def encode_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


IMAGE_FORMATS = ("png", "jpeg", "webp")
DEFAULT_QUALITY = 90  # jpeg / webp quality (a job's output_compression) when the request names none


def encode_image(image, fmt: str = "png", quality: int | None = None) -> bytes:
    """A PIL image as ``fmt`` (png: lossless, ``quality`` must be None; jpeg, webp: lossy at
    ``quality`` 0..100, higher is better and bigger). Deterministic: the same pixels and settings
    give the same bytes (no timestamps or random metadata), so a seeded job's output is repeatable."""
    if fmt == "png":
        if quality is not None:
            raise ValueError("png is lossless: it takes no quality")
        return encode_png(image)
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}")
    q = DEFAULT_QUALITY if quality is None else quality
    if not 0 <= q <= 100:
        raise ValueError(f"quality {q} is outside 0..100")
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=q)
    else:
        image.save(buf, format="WEBP", quality=q, method=4)
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 in MP4 with the index (``moov``) before the media data (``mdat``): a browser can
    start playing from the first bytes, without a range request for the index at the end.
    ``faststart`` moves the index by re-reading the file when it is closed, which needs a real
    (seekable, reopenable) file, so this writes a temporary file rather than a BytesIO."""
    import av

    frames = to_uint8_frames(frames)
    with tempfile.TemporaryDirectory(prefix="genserve-mp4-") as tmp:
        path = os.path.join(tmp, "out.mp4")
        _write_mp4(av, path, frames, fps)
        with open(path, "rb") as f:
            return f.read()


def _write_mp4(av, path: str, frames: np.ndarray, fps: int) -> None:
    n, h, w, _ = frames.shape
    with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"  # the format every player decodes; needs even dimensions
        stream.options = {"crf": "20", "preset": "veryfast"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def thumbnail_frame(kind: str, output):
    """The picture a thumbnail shows: the image itself, or a video's middle frame (the first frame
    of an image-to-video job is the input image; the middle one shows what was generated)."""
    from PIL import Image

    if kind == "image":
        return output.convert("RGB")
    frames = to_uint8_frames(output)
    return Image.fromarray(frames[len(frames) // 2])


def encode_thumbnail(kind: str, output) -> bytes:
    """A JPEG of at most ``THUMBNAIL_MAX_SIDE`` px on the longer side, aspect ratio kept."""
    from PIL import Image

    img = thumbnail_frame(kind, output)
    img.thumbnail((THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buf.getvalue()
