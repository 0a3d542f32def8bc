import pytest

from genserve.config.load import load_config
from genserve.server.requests import RequestError, validate

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


@pytest.mark.parametrize("body, field", [
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": 601}, "timeout_s"),  # above the model's cap (demo default 600 s)
    ({"webhook": "ftp://example.com/x"}, "webhook"),
    ({"webhook": "not a url"}, "webhook"),
    ({"webhook": "http://127.0.0.1/x", "webhook_events": ["finished"]}, "webhook_events"),
    ({"webhook": "http://127.0.0.1/x", "webhook_events": []}, "webhook_events"),
])
def test_deadline_and_webhook_are_validated(body, field):
    with pytest.raises(RequestError) as e:
        v(**body)
    assert e.value.field == field


def test_deadline_defaults_to_the_model_cap_and_webhooks_need_a_secret():
    assert v().timeout_s == 600.0 and v(timeout_s=2.5).timeout_s == 2.5
    p = v(webhook="https://example.com/hook", webhook_events=["progress", "completed", "progress"])
    assert p.webhook_events == ("progress", "completed")
    with pytest.raises(RequestError) as e:
        validate({"model": "demo-image", "prompt": "x", "webhook": "https://example.com/hook"}, MODELS, random_seed=1,
                 webhooks_enabled=False)
    assert e.value.field == "webhook" and "webhook_secret" in e.value.message
