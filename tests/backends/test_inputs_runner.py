"""Image inputs through PipelineRunner on the built-in demo models (the way the worker runs them):
image-to-image and inpainting on demo-image (pipelines built over its components), image-to-video
on demo-i2v. Inputs are read from the result store by key, as the server stores them at submit."""
import io

import numpy as np
import pytest
from PIL import Image

from genserve.backends.demo import ensure_demo_model
from genserve.backends.image_input import check_input
from genserve.backends.runner import PipelineRunner
from genserve.storage import LocalResultStore

from .family_helpers import diff, output

pytestmark = pytest.mark.slow
P = {"width": 32, "height": 32, "num_frames": 0, "steps": 4, "guidance": 1.0, "fps": 8}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    models = tmp_path_factory.mktemp("models")
    r = PipelineRunner("cpu", LocalResultStore(tmp_path_factory.mktemp("results")))
    r.load("img", {"path": str(ensure_demo_model("image", models / "image")), "kind": "image", "dtype": "float32"})
    r.load("i2v", {"path": str(ensure_demo_model("i2v", models / "i2v")), "kind": "video", "dtype": "float32"})
    return r


def stored(runner, jid: str, name: str, img: Image.Image, mask: bool = False) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return runner.store.put(jid, name, check_input(buf.getvalue(), mask=mask).png, "image/png").key


def picture(seed: int = 1, size=(48, 40)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def job(runner, jid, seed, task="text", strength=None, image=None, mask=None):
    j = {"id": jid, "prompt": "a red fox", "negative_prompt": None, "seed": seed, "task": task, "strength": strength}
    if image is not None:
        j["image"] = stored(runner, jid, "input-image.png", image)
    if mask is not None:
        j["mask"] = stored(runner, jid, "input-mask.png", mask, mask=True)
    return j


def run(runner, model, kind, jobs, **params):
    events = []
    runner.run({"batch_id": "b-" + jobs[0]["id"], "model": model, "kind": kind, "params": {**P, **params},
                "jobs": jobs}, events.append, set())
    assert [e["job_id"] for e in events if e["ev"] == "job_done"] == [j["id"] for j in jobs], events
    return events


def test_img2img_uses_the_image_and_is_deterministic(runner):
    run(runner, "img", "image", [job(runner, "t", 5)])
    run(runner, "img", "image", [job(runner, "a", 5, "img2img", 0.5, picture(1)),
                                 job(runner, "b", 5, "img2img", 0.5, picture(2))])
    run(runner, "img", "image", [job(runner, "a2", 5, "img2img", 0.5, picture(1))])
    a, b, a2, t = (output(runner, j, "image") for j in ("a", "b", "a2", "t"))
    assert a.shape == (32, 32, 3)
    assert diff(a, a2) == 0  # same seed and inputs, alone or batched with another image: same bytes
    assert diff(a, b) > 0 and diff(a, t) > 0  # each job's own image matters; not the text-only output


def test_inpaint_repaints_only_the_masked_area(runner):
    """Outside the mask the final latents are the init image's (a 4-channel UNet inpaints by
    blending), so two seeds differ inside the mask and (up to the decoder's reach) not outside."""
    img = picture(4, (32, 32))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # repaint the left half
    run(runner, "img", "image", [job(runner, "in3", 3, "inpaint", 1.0, img, mask),
                                 job(runner, "in4", 4, "inpaint", 1.0, img, mask)])
    run(runner, "img", "image", [job(runner, "t3", 3)])
    a, b, t = (output(runner, j, "image").astype(np.int16) for j in ("in3", "in4", "t3"))
    inside, outside = np.abs(a - b)[:, :8].mean(), np.abs(a - b)[:, 24:].mean()
    assert inside > 4 * outside, (inside, outside)
    assert diff(a, t) > 0


def test_image_to_video_on_demo_i2v(runner):
    frames = dict(num_frames=5)
    run(runner, "i2v", "video", [job(runner, "v1", 1, "i2v", image=Image.new("RGB", (48, 40), (250, 250, 250)))],
        **frames)
    run(runner, "i2v", "video", [job(runner, "v2", 1, "i2v", image=Image.new("RGB", (48, 40), (0, 0, 0)))], **frames)
    v1, v2 = output(runner, "v1", "video"), output(runner, "v2", "video")
    assert v1.shape == (5, 32, 32, 3) and diff(v1, v2) > 0
