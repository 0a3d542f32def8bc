"""PipelineRunner on the real (tiny, random-weight) demo image pipeline, called the way the worker
process calls it (see genserve/workers/process.py): load, run(msg, emit, canceled, on_step), unload."""
import io

import numpy as np
import pytest
from PIL import Image

from genserve.backends.demo import ensure_demo_model
from genserve.backends.encode import encode_image
from genserve.backends.runner import BatchAborted, PipelineRunner
from genserve.storage import LocalResultStore

pytestmark = pytest.mark.slow

PARAMS = {"width": 32, "height": 32, "num_frames": 0, "steps": 2, "guidance": 1.0, "fps": 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Like a worker given its share of the cores (``torch.set_num_threads`` in worker_main): on a
    shared, busy machine torch's default thread count makes each step many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_image(tmp_path_factory):
    return ensure_demo_model("image", tmp_path_factory.mktemp("models") / "demo-image")


def spec(path):
    return {"path": str(path), "kind": "image", "dtype": "float32"}


@pytest.fixture(scope="module")
def runner(demo_image, tmp_path_factory):
    r = PipelineRunner("cpu", LocalResultStore(tmp_path_factory.mktemp("results")))
    r.load("demo", spec(demo_image))
    return r


def batch(batch_id, *jobs, **params):
    return {"batch_id": batch_id, "model": "demo", "kind": "image", "params": {**PARAMS, **params},
            "jobs": [{"id": jid, "prompt": "a red fox", "negative_prompt": None, "seed": seed} for jid, seed in jobs]}


def run(runner, msg, canceled=None, on_step=lambda step: None):
    events = []
    peak = runner.run(msg, events.append, set() if canceled is None else canceled, on_step=on_step)
    return events, peak


def evs(events, kind):
    return [e for e in events if e["ev"] == kind]


def output(runner, job_id):
    return runner.store.local_path(f"{job_id}/output.png").read_bytes()


def test_two_job_batch_writes_outputs_and_reports_progress(runner):
    steps_seen = []
    events, peak = run(runner, batch("b1", ("b1-a", 1), ("b1-b", 2)), on_step=steps_seen.append)
    assert [e["ev"] for e in events] == ["started", "progress", "progress", "job_done", "job_done"]
    assert [(e["step"], e["total"]) for e in evs(events, "progress")] == [(1, 2), (2, 2)]
    assert all(e["batch_id"] == "b1" for e in events)
    assert steps_seen == [0, 1]  # the fault hook runs at the end of every step, 0-based
    done = evs(events, "job_done")
    assert [e["job_id"] for e in done] == ["b1-a", "b1-b"]
    started = evs(events, "started")[0]["t"]
    for e in done:
        ref = e["result"]
        assert ref["key"] == f"{e['job_id']}/output.png" and ref["content_type"] == "image/png"
        data = output(runner, e["job_id"])
        assert ref["bytes"] == len(data)
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.size == (32, 32)
        assert np.asarray(img).std() > 0  # not a blank image
        assert started == e["inference_start"] <= e["inference_end"] <= e["output_written"]
    assert peak == 0  # CPU: nothing measured
    assert runner.estimated_bytes(batch("b1", ("b1-a", 1), ("b1-b", 2))) > 0  # the family's estimate: a hint


def test_same_seed_same_bytes_different_seed_different_output(runner):
    run(runner, batch("s1", ("s1-a", 7), ("s1-b", 8)))
    run(runner, batch("s2", ("s2-a", 7), ("s2-b", 8)))
    assert output(runner, "s1-a") == output(runner, "s2-a")
    assert output(runner, "s1-b") == output(runner, "s2-b")
    # same prompt, different seed: a different picture
    a = np.asarray(Image.open(io.BytesIO(output(runner, "s1-a"))), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(output(runner, "s1-b"))), dtype=np.int16)
    assert np.abs(a - b).mean() > 1.0


def test_each_job_of_a_batch_gets_its_own_output_format(runner):
    msg = batch("fmt", ("fmt-png", 3), ("fmt-jpeg", 3), ("fmt-webp", 3))
    for j, (fmt, q) in zip(msg["jobs"], [(None, None), ("jpeg", 80), ("webp", 50)]):
        j.update(output_format=fmt, output_compression=q)
    events, _ = run(runner, msg)
    refs = {e["job_id"]: e["result"] for e in evs(events, "job_done")}
    assert [(r["key"], r["content_type"]) for r in refs.values()] == [
        ("fmt-png/output.png", "image/png"), ("fmt-jpeg/output.jpeg", "image/jpeg"),
        ("fmt-webp/output.webp", "image/webp")]
    imgs = {jid: Image.open(io.BytesIO(runner.store.read(r["key"]))) for jid, r in refs.items()}
    assert [i.format for i in imgs.values()] == ["PNG", "JPEG", "WEBP"]
    # The same pixels (same seed, one batch), only encoded differently, at the job's quality.
    pixels = imgs["fmt-png"].convert("RGB")
    assert runner.store.read(refs["fmt-jpeg"]["key"]) == encode_image(pixels, "jpeg", 80)
    assert runner.store.read(refs["fmt-webp"]["key"]) == encode_image(pixels, "webp", 50)


def test_other_size_is_honoured(runner):
    events, _ = run(runner, batch("sz", ("sz-a", 1), width=64, height=32))
    assert len(evs(events, "job_done")) == 1
    assert Image.open(io.BytesIO(output(runner, "sz-a"))).size == (64, 32)


def test_cancel_one_job_at_a_step_boundary(runner):
    canceled: set[str] = set()

    def on_step(step):
        if step == 0:
            canceled.add("c-b")  # arrives (from the reader thread, in the worker) during step 1

    events, _ = run(runner, batch("c", ("c-a", 1), ("c-b", 2)), canceled, on_step)
    kinds = [(e["ev"], e.get("job_id") or e.get("step")) for e in events]
    assert kinds == [("started", None), ("progress", 1), ("job_canceled", "c-b"), ("progress", 2),
                     ("job_done", "c-a")]
    assert not runner.store.exists("c-b/output.png")
    assert runner.store.exists("c-a/output.png")
    assert canceled == {"c-b"}  # the worker, not the runner, forgets cancels after the batch


def test_cancel_before_the_start_and_cancel_of_everyone(runner):
    # every job canceled before the pipeline starts: nothing runs at all
    events = []
    with pytest.raises(BatchAborted):
        runner.run(batch("x1", ("x1-a", 1), ("x1-b", 2)), events.append, {"x1-a", "x1-b"})
    assert [(e["ev"], e["job_id"]) for e in events] == [("job_canceled", "x1-a"), ("job_canceled", "x1-b")]

    # the last live job canceled at a step boundary: the pipeline stops there
    canceled: set[str] = {"x2-a"}
    events = []
    with pytest.raises(BatchAborted):
        runner.run(batch("x2", ("x2-a", 1), ("x2-b", 2)), events.append, canceled,
                   on_step=lambda step: canceled.add("x2-b"))
    assert [(e["ev"], e.get("job_id") or e.get("step")) for e in events] == [
        ("job_canceled", "x2-a"), ("started", None), ("progress", 1), ("job_canceled", "x2-b")]
    for jid in ("x1-a", "x1-b", "x2-a", "x2-b"):
        assert not runner.store.exists(f"{jid}/output.png")


def test_load_and_unload_report_bytes(demo_image, tmp_path):
    r = PipelineRunner("cpu", LocalResultStore(tmp_path))
    assert r.capacity(123 << 20) == 123 << 20  # CPU: the configured budget
    first = r.load("demo", spec(demo_image))
    assert first["cached"] is False and first["tier"] == "disk" and first["model"] == "demo"
    assert first["bytes"] > 1 << 20  # a few MB of float32 weights
    assert first["load_start"] <= first["load_end"]
    assert r.used_bytes() == first["bytes"]
    again = r.load("demo", spec(demo_image))
    assert again == {"model": "demo", "cached": True, "bytes": first["bytes"], "tier": "resident"}

    second = r.load("demo-2", spec(demo_image))  # the same weights under another name: same size
    assert second["bytes"] == first["bytes"] and second["tier"] == "disk"
    assert r.used_bytes() == 2 * first["bytes"]

    gone = r.unload("demo")
    assert gone == {"model": "demo", "freed_bytes": first["bytes"], "kept_in": None,
                    "used_bytes": first["bytes"], "resident": ["demo-2"]}
    assert "demo" not in r.pipes
    assert r.unload("never-loaded") == {"model": "never-loaded", "freed_bytes": 0, "kept_in": None,
                                        "used_bytes": first["bytes"], "resident": ["demo-2"]}
    back = r.load("demo", spec(demo_image))
    assert back["cached"] is False and back["tier"] == "page_cache"  # loaded before by this process
    assert back["bytes"] == first["bytes"]


def test_load_of_a_missing_model_raises(tmp_path):
    r = PipelineRunner("cpu", LocalResultStore(tmp_path / "res"))
    with pytest.raises(Exception):
        r.load("ghost", spec(tmp_path / "no-such-model"))
    assert r.pipes == {} and r.used_bytes() == 0
