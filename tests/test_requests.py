import pytest

from genserve.config import load_config
from genserve.requests import RequestError, validate

MODELS = load_config(None).models


def v(**body):
    return validate({"model": "demo-image", "prompt": "a cat", **body}, MODELS, random_seed=7)


def test_defaults_filled_in():
    p = v()
    assert (p.width, p.height, p.steps, p.num_frames, p.seed, p.priority) == (64, 64, 8, 0, 7, "standard")
    vid = validate({"model": "demo-video", "prompt": "x"}, MODELS, random_seed=1)
    assert vid.num_frames == 9 and vid.key.num_frames == 9


@pytest.mark.parametrize("body, field", [
    ({"model": "nope"}, "model"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"width": 60, "height": 64}, "width"),
    ({"width": 256, "height": 256}, "size"),
    ({"steps": 0}, "steps"),
    ({"steps": 1000}, "steps"),
    ({"num_frames": 9}, "num_frames"),
    ({"seed": -1}, "seed"),
    ({"priority": "urgent"}, "priority"),
    ({"guidance": 100.0}, "guidance"),
])
def test_bad_input_names_the_field(body, field):
    with pytest.raises(RequestError) as e:
        v(**body)
    assert e.value.field == field and e.value.status == 400


def test_video_frame_rules_and_pixel_limit():
    with pytest.raises(RequestError) as e:
        validate({"model": "demo-video", "prompt": "x", "num_frames": 8}, MODELS, random_seed=1)
    assert e.value.field == "num_frames" and "multiple of 4" in e.value.message
    with pytest.raises(RequestError) as e:
        validate({"model": "demo-video", "prompt": "x", "width": 256, "height": 256}, MODELS, random_seed=1)
    assert e.value.field == "size" and "exceeds" in e.value.message
    with pytest.raises(RequestError) as e:
        validate({"model": "demo-video", "prompt": "x", "width": 72, "height": 64}, MODELS, random_seed=1)
    assert e.value.field == "width"
