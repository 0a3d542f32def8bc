"""What the worker writes for each finished job, on the real (tiny, random-weight) demo pipelines,
through both paths that write outputs: the request-level runner (``PipelineRunner.run``) and the
step-level loop (``step_runner.run_steps``). Each output gets a JPEG thumbnail next to it, recorded
in the job's ResultRef; videos are MP4 with the index first (faststart)."""
import io
import queue

import av
import numpy as np
import pytest
from PIL import Image

from genserve.backends.demo import ensure_demo_model
from genserve.backends.runner import PipelineRunner
from genserve.backends.step_runner import run_steps
from genserve.storage import LocalResultStore

from .test_encode import top_level_boxes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    r = PipelineRunner("cpu", LocalResultStore(tmp_path_factory.mktemp("results")))
    for kind in ("image", "video"):
        path = ensure_demo_model(kind, models / f"demo-{kind}")
        r.load(kind, {"path": str(path), "kind": kind, "dtype": "float32"})
    return r


def msg(kind, batch_id, *job_ids, mode=None, w=64, h=32):
    params = {"width": w, "height": h, "num_frames": 5 if kind == "video" else 0, "steps": 2, "guidance": 1.0,
              "fps": 8}
    jobs = [{"id": j, "prompt": "a red fox", "negative_prompt": None, "seed": i + 1, "steps": 2, "guidance": 1.0}
            for i, j in enumerate(job_ids)]
    m = {"batch_id": batch_id, "model": kind, "kind": kind, "params": params, "jobs": jobs}
    return {**m, "mode": "step", "max_size": 4} if mode == "step" else m


def done_refs(events):
    return {e["job_id"]: e["result"] for e in events if e["ev"] == "job_done"}


def blocks(a):
    h, w, c = a.shape
    return a.reshape(h // 8, 8, w // 8, 8, c).mean(axis=(1, 3))


def check_ref(runner, job_id, ref, kind, w=64, h=32):
    """The ResultRef names the output and its thumbnail, with their real sizes; the thumbnail is a
    JPEG of the output's size (under 256 px: not scaled) showing the same picture."""
    out_name = "output.png" if kind == "image" else "output.mp4"
    assert ref["key"] == f"{job_id}/{out_name}"
    thumb = ref["thumbnail"]
    assert thumb == {"key": f"{job_id}/thumbnail.jpg", "content_type": "image/jpeg",
                     "bytes": runner.store.head(thumb["key"]).bytes}
    data = runner.store.read(ref["key"])
    assert ref["bytes"] == len(data)
    img = Image.open(io.BytesIO(runner.store.read(thumb["key"])))
    assert img.format == "JPEG" and img.size == (w, h)
    if kind == "image":
        picture = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    else:
        assert top_level_boxes(data).index("moov") < top_level_boxes(data).index("mdat")
        with av.open(io.BytesIO(data)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (h, w, 3)
        picture = frames[len(frames) // 2].astype(np.float32)  # the middle frame
    # JPEG (and H.264) are lossy, and random weights paint noise JPEG smooths: compare 8x8 block
    # means, which match closely for the same picture and not for another one.
    assert np.abs(blocks(np.asarray(img, dtype=np.float32)) - blocks(picture)).mean() < 3  # own ~1.3, another seed ~7
    assert np.asarray(img).std() > 0


@pytest.mark.parametrize("kind", ["image", "video"])
def test_request_level_run_writes_a_thumbnail_next_to_each_output(runner, kind):
    events = []
    runner.run(msg(kind, f"r-{kind}", f"r-{kind}-a", f"r-{kind}-b"), events.append, set())
    refs = done_refs(events)
    assert set(refs) == {f"r-{kind}-a", f"r-{kind}-b"}
    for job_id, ref in refs.items():
        check_ref(runner, job_id, ref, kind)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_step_level_run_writes_a_thumbnail_next_to_each_output(runner, kind):
    events = []
    run_steps(runner, msg(kind, f"s-{kind}", f"s-{kind}-a", mode="step"), events.append, set(), queue.Queue(), set())
    refs = done_refs(events)
    assert set(refs) == {f"s-{kind}-a"}
    check_ref(runner, f"s-{kind}-a", refs[f"s-{kind}-a"], kind)


def test_a_canceled_job_gets_neither_output_nor_thumbnail(runner):
    events = []
    runner.run(msg("image", "c1", "c1-a", "c1-b"), events.append, {"c1-b"})
    assert set(done_refs(events)) == {"c1-a"}
    assert not runner.store.exists("c1-b/output.png") and not runner.store.exists("c1-b/thumbnail.jpg")
