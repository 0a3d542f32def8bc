"""Image inputs without a server (issue 22, item 1): the size limits checked from the header, and
``fit_cover``'s work bounded by the output (crop to the target's aspect, then scale), never by how
far the input's aspect ratio is from the target's."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from genserve.backends.image_input import MAX_ASPECT, MAX_SIDE, ImageInputError, check_input, fit_cover


def png(size, mode="RGB", color=0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def made(monkeypatch):
    """The size of every image Pillow materialises (each result of an Image method passes through
    ``Image._new``), so a test can bound the work of a fit."""
    sizes: list[tuple[int, int]] = []
    original = Image.Image._new

    def spy(self, im):
        sizes.append(tuple(im.size))
        return original(self, im)

    monkeypatch.setattr(Image.Image, "_new", spy)
    return sizes


@pytest.mark.parametrize("size,target", [((4096, 8), (64, 64)), ((8, 4096), (64, 64)), ((131072, 8), (128, 128)),
                                         ((4000, 3000), (32, 32)), ((40, 30), (512, 256))])
def test_fit_cover_makes_no_image_larger_than_its_output(made, size, target):
    img = Image.new("RGB", size, (10, 20, 30))
    made.clear()
    out = fit_cover(img, *target)
    assert out.size == target and out.getpixel((0, 0)) == (10, 20, 30)
    # The old fit scaled a 4096 x 8 strip to cover 64 x 64 first: a 32768 x 64 image.
    assert made and max(w * h for w, h in made) <= target[0] * target[1], made


def test_fit_cover_keeps_the_centre_of_the_picture():
    # Three vertical bands, red | green | blue: a square fit of the 3:1 picture is the green band.
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))
    img.paste((0, 0, 255), (200, 0, 300, 100))

    def green(p) -> bool:  # Lanczos rings a little at the band edges
        return p[1] > 240 and p[0] < 15 and p[2] < 15

    out = fit_cover(img, 32, 32)
    assert all(green(out.getpixel((x, y))) for x in (1, 16, 30) for y in (0, 31))
    # and the other way round: a tall picture keeps its middle rows
    tall = img.transpose(Image.Transpose.ROTATE_90)
    assert all(green(fit_cover(tall, 16, 16).getpixel((x, y))) for x in (0, 15) for y in (1, 8, 14))
    # the aspect kept: a 2:1 fit of a 2:1 picture is the whole picture, scaled
    assert fit_cover(img.crop((0, 0, 200, 100)), 20, 10).getpixel((19, 5))[1] > 200


@pytest.mark.parametrize("size,words", [
    ((2_097_152, 8), f"at most {MAX_SIDE}"),  # within MAX_PIXELS, a few KB: refused for its side
    ((8, MAX_SIDE + 1), f"at most {MAX_SIDE}"),
    ((MAX_SIDE, MAX_SIDE // MAX_ASPECT - 1), f"at most {MAX_ASPECT}:1"),
    ((100, 100 * MAX_ASPECT + 1), f"at most {MAX_ASPECT}:1"),
])
def test_sides_and_aspect_are_limited_before_decoding(size, words):
    data = png(size, mode="1")
    assert len(data) < 300_000  # a tiny file: the limit is on what it would decode to
    with pytest.raises(ImageInputError, match=words):
        check_input(data)
    with pytest.raises(ImageInputError, match=words):
        check_input(data, mask=True)


def test_inputs_at_the_limits_pass():
    assert check_input(png((MAX_SIDE, MAX_SIDE // MAX_ASPECT), mode="1")).size == (MAX_SIDE, MAX_SIDE // MAX_ASPECT)
    assert check_input(png((8, 8 * MAX_ASPECT))).size == (8, 8 * MAX_ASPECT)
