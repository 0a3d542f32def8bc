"""Output encoders: what they write decodes back to the right size, frames and (roughly) content."""
import io
import struct

import av
import numpy as np
import pytest
from PIL import Image

from genserve.backends.encode import encode_mp4, encode_png, encode_thumbnail, to_uint8_frames


def decode_mp4(data: bytes):
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        return stream, frames


# ---- to_uint8_frames --------------------------------------------------------------------------------


def test_float_frames_are_clipped_and_rounded():
    arr = np.array([[-0.5, 0.0, 0.2, 0.5, 1.0, 1.7]], dtype=np.float32).reshape(1, 1, 2, 3)
    out = to_uint8_frames(arr)
    assert out.dtype == np.uint8
    assert out.reshape(-1).tolist() == [0, 0, 51, 128, 255, 255]


def test_uint8_frames_pass_through_unchanged():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(2, 4, 6, 3), dtype=np.uint8)
    out = to_uint8_frames(arr)
    assert out.dtype == np.uint8 and np.array_equal(out, arr)  # not rescaled as if it were [0,1] floats


def test_list_of_pil_images_is_stacked():
    imgs = [Image.new("RGB", (6, 4), (i * 40, 0, 255 - i * 40)) for i in range(3)]
    out = to_uint8_frames(imgs)
    assert out.shape == (3, 4, 6, 3) and out.dtype == np.uint8
    assert out[2, 0, 0].tolist() == [80, 0, 175]


# ---- PNG --------------------------------------------------------------------------------------------


def test_png_round_trips_exactly():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)  # H=24, W=40: not square on purpose
    data = encode_png(Image.fromarray(pixels))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.size == (40, 24) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), pixels)  # lossless


def test_png_of_different_images_differs():
    a = encode_png(Image.new("RGB", (8, 8), (0, 0, 0)))
    b = encode_png(Image.new("RGB", (8, 8), (255, 0, 0)))
    assert a != b


# ---- MP4 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,h,w,fps", [(5, 32, 48, 8), (1, 16, 16, 24), (9, 64, 32, 16)])
def test_mp4_has_every_frame_at_the_right_size(n, h, w, fps):
    rng = np.random.default_rng(n)
    frames = rng.random((n, h, w, 3), dtype=np.float32)  # float [0,1], like a pipeline's "np" output
    data = encode_mp4(frames, fps)
    stream, decoded = decode_mp4(data)
    assert stream.codec_context.name == "h264"
    assert (stream.codec_context.width, stream.codec_context.height) == (w, h)
    assert len(decoded) == n
    assert all(f.shape == (h, w, 3) for f in decoded)
    assert stream.average_rate == fps or stream.guessed_rate == fps


def test_mp4_keeps_the_picture():
    # Three flat frames of different colours: lossy, but each must come back close to its colour.
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    frames = np.stack([np.full((32, 32, 3), c, dtype=np.uint8) for c in colours])
    _, decoded = decode_mp4(encode_mp4(frames, 8))
    assert len(decoded) == 3
    for got, want in zip(decoded, colours):
        mean = got.reshape(-1, 3).mean(axis=0)
        assert np.all(np.abs(mean - np.array(want)) < 12), (mean, want)


def test_mp4_from_pil_frames():
    imgs = [Image.new("RGB", (32, 16), (i * 60, 100, 100)) for i in range(4)]
    stream, decoded = decode_mp4(encode_mp4(imgs, 10))
    assert len(decoded) == 4 and decoded[0].shape == (16, 32, 3)


# ---- JPEG / WebP (a job's output_format) ----------------------------------------------------------------


@pytest.mark.parametrize("fmt,pil,magic", [("jpeg", "JPEG", b"\xff\xd8\xff"), ("webp", "WEBP", b"RIFF")])
def test_lossy_formats_decode_back_and_quality_trades_size(fmt, pil, magic):
    from genserve.backends.encode import encode_image

    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8))
    low, high = encode_image(img, fmt, 10), encode_image(img, fmt, 95)
    assert low.startswith(magic) and high.startswith(magic)
    back = Image.open(io.BytesIO(high))
    assert back.format == pil and back.size == (40, 24)
    assert len(low) < len(high)
    assert encode_image(img, fmt, 95) == high  # deterministic: a seeded job's bytes repeat
    assert encode_image(img, fmt) == encode_image(img, fmt, 90)  # the default quality


def test_png_through_encode_image_is_the_png_encoder_and_takes_no_quality():
    from genserve.backends.encode import encode_image

    img = Image.new("RGB", (8, 8), (1, 2, 3))
    assert encode_image(img, "png") == encode_png(img)
    with pytest.raises(ValueError):
        encode_image(img, "png", 50)
    with pytest.raises(ValueError):
        encode_image(img, "gif")


def top_level_boxes(data: bytes) -> list[str]:
    """The types of an MP4's top-level boxes, in file order (ISO BMFF: 32-bit size + 4-char type;
    size 1: a 64-bit size follows; size 0: to the end of the file)."""
    out, i = [], 0
    while i + 8 <= len(data):
        size, typ = struct.unpack(">I4s", data[i:i + 8])
        if size == 1:
            size = struct.unpack(">Q", data[i + 8:i + 16])[0]
        elif size == 0:
            size = len(data) - i
        assert size >= 8, (typ, size, i)
        out.append(typ.decode("latin-1"))
        i += size
    assert i == len(data), "the boxes must tile the file exactly"
    return out


@pytest.mark.parametrize("n,h,w", [(5, 32, 48), (16, 64, 64)])
def test_mp4_is_faststart_moov_before_mdat(n, h, w):
    frames = np.random.default_rng(n).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    data = encode_mp4(frames, 8)
    boxes = top_level_boxes(data)
    assert boxes[0] == "ftyp" and "moov" in boxes and "mdat" in boxes, boxes
    assert boxes.index("moov") < boxes.index("mdat"), boxes  # a browser plays it from the first bytes
    stream, decoded = decode_mp4(data)  # and moving the index kept it valid
    assert len(decoded) == n and decoded[0].shape == (h, w, 3)


# ---- thumbnails -------------------------------------------------------------------------------------


def decode_jpeg(data: bytes) -> Image.Image:
    assert data[:3] == b"\xff\xd8\xff"
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.mode == "RGB"
    return img


@pytest.mark.parametrize("size,want", [((1024, 512), (256, 128)), ((300, 900), (85, 256)), ((64, 64), (64, 64)),
                                       ((256, 256), (256, 256))])
def test_image_thumbnail_is_a_small_jpeg_keeping_aspect(size, want):
    img = Image.new("RGB", size, (200, 40, 40))
    thumb = decode_jpeg(encode_thumbnail("image", img))
    assert thumb.size == want  # the longer side at most 256 px; a smaller image is not upscaled
    mean = np.asarray(thumb).reshape(-1, 3).mean(axis=0)
    assert np.all(np.abs(mean - (200, 40, 40)) < 10), mean


def test_image_thumbnail_of_an_rgba_image():
    thumb = decode_jpeg(encode_thumbnail("image", Image.new("RGBA", (40, 20), (10, 200, 10, 128))))
    assert thumb.size == (40, 20)


def test_video_thumbnail_is_the_middle_frame():
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    frames = np.stack([np.full((48, 640, 3), c, dtype=np.uint8) for c in colours]).astype(np.float32) / 255.0
    thumb = decode_jpeg(encode_thumbnail("video", frames))  # float frames, like the pipeline's "np" output
    assert thumb.size == (256, 19)  # 640x48 -> 256 x round(48 * 256 / 640)
    mean = np.asarray(thumb).reshape(-1, 3).mean(axis=0)
    assert np.all(np.abs(mean - colours[2]) < 12), mean  # frame 4 // 2 = 2
    one = decode_jpeg(encode_thumbnail("video", frames[:1]))
    assert np.all(np.abs(np.asarray(one).reshape(-1, 3).mean(axis=0) - colours[0]) < 12)
