"""Output encoders: PNG, JPEG or WebP (Pillow) for images, H.264 MP4 (PyAV) for videos."""
from __future__ import annotations

import io

import numpy as np


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
    import av

    frames = to_uint8_frames(frames)
    n, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
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
    return buf.getvalue()
