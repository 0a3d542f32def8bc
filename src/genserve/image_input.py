"""The ``image`` request field: a conditioning image as a base64 ``data:`` URL of a PNG or JPEG.

Validated at submit (decoded with Pillow: format, dimensions, pixel limit) and decoded again in
the worker, where it is fitted to the requested size by ``fit_cover``: scaled (Lanczos) so it
covers width × height with its aspect ratio kept, then centre-cropped to exactly that size.
"""
from __future__ import annotations

import base64
import binascii
import io

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG"}
MAX_BYTES = 16 << 20  # encoded size
MAX_PIXELS = 4096 * 4096  # decoded size (a decompression bomb is refused before it is decoded)
MIN_SIDE = 8


class ImageInputError(ValueError):
    pass


def _split(url: str) -> tuple[str, bytes]:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ImageInputError("must be a data URL: data:image/png;base64,… or data:image/jpeg;base64,…")
    head, sep, payload = url[5:].partition(",")
    mime, _, enc = head.partition(";")
    if not sep or enc != "base64" or mime not in FORMATS:
        raise ImageInputError("must be a base64 data URL of an image/png or image/jpeg")
    if len(payload) > MAX_BYTES * 4 // 3 + 4:
        raise ImageInputError(f"is larger than {MAX_BYTES >> 20} MiB")
    try:
        return mime, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("is not valid base64") from None


def decode_data_url(url: str):
    """The image as an RGB PIL image; raises ImageInputError with a reason."""
    from PIL import Image

    mime, data = _split(url)
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != FORMATS[mime]:
            raise ImageInputError(f"says {mime} but holds {img.format or 'something else'}")
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageInputError(f"is {w}x{h}; at most {MAX_PIXELS} pixels")
        if min(w, h) < MIN_SIDE:
            raise ImageInputError(f"is {w}x{h}; each side must be at least {MIN_SIDE} pixels")
        img.load()
    except ImageInputError:
        raise
    except Exception as e:  # truncated or corrupt data: Pillow raises several types
        raise ImageInputError(f"cannot be decoded: {e}") from None
    return img.convert("RGB")


def fit_cover(img, width: int, height: int):
    """Scale to cover width × height keeping the aspect ratio, then centre-crop to exactly it."""
    from PIL import Image

    w, h = img.size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - width) // 2, (nh - height) // 2
    return img.crop((left, top, left + width, top + height))


def data_url(img, fmt: str = "PNG") -> str:
    """An image as a data URL (for clients and tests)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()
