"""Image inputs of a job (``image``, ``mask``): decoding, limits, and fitting to the requested size.

An input arrives as a base64 ``data:`` URL (PNG, JPEG or WebP), as the bytes of a multipart file
part, or as an earlier job's output (the server reads it from the result store; a video output
gives its first frame). Whatever the form, ``check_input`` decodes it for real with Pillow at
submit: at most ``MAX_BYTES`` encoded; decoded, each side between ``MIN_SIDE`` and ``MAX_SIDE``,
at most ``MAX_PIXELS`` in total and an aspect ratio of at most ``MAX_ASPECT``:1 (all checked from
the header, before a byte of pixel data is decoded: a decompression bomb, or a thin strip of a few
hundred bytes, is refused, not expanded). It is then normalized to PNG (RGB for an image, 8-bit
grey for a mask) and stored with the job; the worker reads it back and fits it with
``fit_cover``: centre-cropped to the aspect ratio of width × height, then scaled (Lanczos) to
exactly that size, so the work is bounded by the input and the output, never by their ratio.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
MAX_BYTES = 16 << 20  # encoded size
MAX_SIDE = 4096  # each decoded side (a 2,097,152 x 8 strip is within MAX_PIXELS but not this)
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # decoded size (a decompression bomb is refused before it is decoded)
MIN_SIDE = 8
MAX_ASPECT = 16  # the long side over the short one: a panorama passes, a thin strip does not


class ImageInputError(ValueError):
    pass


@dataclass(frozen=True)
class InputImage:
    """A validated input, normalized to PNG bytes (what is stored with the job)."""

    png: bytes
    width: int
    height: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.png).hexdigest()

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def split_data_url(url: str) -> tuple[str, bytes]:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ImageInputError("must be a data URL: data:image/png;base64,… (or image/jpeg, image/webp)")
    head, sep, payload = url[5:].partition(",")
    mime, _, enc = head.partition(";")
    if not sep or enc != "base64" or mime not in FORMATS:
        raise ImageInputError("must be a base64 data URL of an image/png, image/jpeg or image/webp")
    if len(payload) > MAX_BYTES * 4 // 3 + 4:
        raise ImageInputError(f"is larger than {MAX_BYTES >> 20} MiB")
    try:
        return mime, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("is not valid base64") from None


def decode_bytes(data: bytes, declared: str | None = None):
    """Decode an encoded image under the limits; a PIL image (not yet converted). ``declared``: the
    MIME type the client claimed (a data URL's), which must match what the bytes hold."""
    from PIL import Image

    if len(data) > MAX_BYTES:
        raise ImageInputError(f"is {len(data)} bytes; at most {MAX_BYTES >> 20} MiB")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; the size is checked
            # below from the header alone, before anything is decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(FORMATS.values()))
            if declared is not None and img.format != FORMATS[declared]:
                raise ImageInputError(f"says {declared} but holds {img.format or 'something else'}")
            check_size(*img.size)
            img.load()
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(f"has too many pixels (at most {MAX_PIXELS})") from None
    except Exception as e:  # not an image, truncated or corrupt data: Pillow raises several types
        raise ImageInputError(f"is not a PNG, JPEG or WebP image Pillow can decode ({type(e).__name__})") from None
    return img


def check_size(w: int, h: int) -> None:
    """The decoded size's limits (from the header: nothing is decoded yet)."""
    if max(w, h) > MAX_SIDE:
        raise ImageInputError(f"is {w}x{h}; each side must be at most {MAX_SIDE} pixels")
    if w * h > MAX_PIXELS:
        raise ImageInputError(f"is {w}x{h}; at most {MAX_PIXELS} pixels")
    if min(w, h) < MIN_SIDE:
        raise ImageInputError(f"is {w}x{h}; each side must be at least {MIN_SIDE} pixels")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageInputError(f"is {w}x{h}; its aspect ratio must be at most {MAX_ASPECT}:1")


def check_input(data: bytes, *, mask: bool = False, declared: str | None = None) -> InputImage:
    """Decode and normalize an input: RGB for an image; for a mask, 8-bit grey (white = repaint)."""
    img = decode_bytes(data, declared)
    img = img.convert("L") if mask else _rgb(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return InputImage(buf.getvalue(), img.width, img.height)


def _rgb(img):
    """RGB, with any transparency composited over white (a transparent area has no colour to keep)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        from PIL import Image

        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def decode_data_url(url: str):
    """A data URL's image as RGB (validated as at submit); raises ImageInputError with a reason."""
    mime, data = split_data_url(url)
    return _rgb(decode_bytes(data, mime))


def first_frame_png(mp4: bytes) -> bytes:
    """The first frame of a video result, as PNG (a video output used as an image input)."""
    import av

    with av.open(io.BytesIO(mp4)) as container:
        for frame in container.decode(video=0):
            buf = io.BytesIO()
            frame.to_image().save(buf, format="PNG")
            return buf.getvalue()
    raise ImageInputError("the referenced video has no frames")


def open_input(ref: str, read) -> "object":
    """Worker side: a job's stored input (a result-store key, read with ``read``) as a PIL image;
    a legacy record's data URL is decoded directly."""
    from PIL import Image

    if ref.startswith("data:"):
        return decode_data_url(ref)
    img = Image.open(io.BytesIO(read(ref)))
    img.load()
    return img


def fit_cover(img, width: int, height: int):
    """Centre-crop to width × height's aspect ratio, then scale (Lanczos) to exactly that size: the
    same picture as scaling to cover and cropping, but the crop is the resize's source box, so the
    only image made is the output. Scaling first made an image of the input's aspect at the
    output's scale: a 131072 x 8 strip covering 128 x 128 became 2,097,152 x 128 pixels (1.7 GB)."""
    from PIL import Image

    w, h = img.size
    if w * height > h * width:  # wider than the target: keep the full height
        cw, ch = h * width / height, float(h)
    else:
        cw, ch = float(w), w * height / width
    left, top = (w - cw) / 2, (h - ch) / 2
    return img.resize((width, height), Image.Resampling.LANCZOS, box=(left, top, left + cw, top + ch))


def data_url(img, fmt: str = "PNG") -> str:
    """An image as a data URL (for clients and tests)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()
