"""Step-level batching (genserve/backends/stepping.py) on the real demo pipelines: a request's
output under step-level batching equals its standalone pipeline output with the same seed,
whatever joins, leaves, pauses or is canceled around it.

Tolerance: at most 2/255 per pixel channel (images) and 2/255 per frame value (video). Step
batching changes only how rows are grouped in the denoiser's batched kernels (floating-point
reassociation, ~1e-6 relative in float32); two levels leave room for a rounding flip at the
8-bit quantisation of an output whose latents differ in the last bits."""
import random

import numpy as np
import pytest
import torch

from genserve.backends.demo import ensure_demo_model
from genserve.backends.families import adapter_for
from genserve.backends.stepping import RunningSet, StepJob

pytestmark = pytest.mark.slow

TOL = 2 / 255
IMAGE = {"width": 32, "height": 32}
VIDEO = {"width": 32, "height": 32, "num_frames": 5}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(kind, tmp_path_factory):
    from diffusers import DiffusionPipeline

    path = ensure_demo_model(kind, tmp_path_factory.mktemp("models") / f"demo-{kind}")
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image_pipe(tmp_path_factory):
    return _load("image", tmp_path_factory)


@pytest.fixture(scope="module")
def video_pipe(tmp_path_factory):
    return _load("video", tmp_path_factory)


def standalone(pipe, job: StepJob, shape, kind):
    call = dict(prompt=job.prompt, negative_prompt=job.negative_prompt, num_inference_steps=job.steps,
                guidance_scale=job.guidance, generator=[torch.Generator("cpu").manual_seed(job.seed)],
                width=shape["width"], height=shape["height"])
    with torch.inference_mode():
        if kind == "image":
            return np.asarray(pipe(**call, output_type="pil").images[0], dtype=np.float32) / 255
        return np.asarray(pipe(**call, num_frames=shape["num_frames"], output_type="np").frames[0])


def as_array(out, kind):
    return np.asarray(out, dtype=np.float32) / 255 if kind == "image" else np.asarray(out)


JOBS = [
    StepJob("a", "a red fox in the snow", seed=1, steps=6, guidance=7.5),
    StepJob("b", "a lighthouse", seed=2, steps=3, guidance=4.0, negative_prompt="blurry"),
    StepJob("c", "a bowl of fruit", seed=3, steps=5, guidance=1.0),
    StepJob("d", "a city at night", seed=4, steps=4, guidance=6.0),
]


def drive(pipe, shape, script, max_size=4):
    """Run a script of (step_number -> actions) on one RunningSet; returns outputs by job id and
    the set. Actions: ("admit", job), ("cancel", id), ("pause", id), ("resume", id)."""
    kind = "video" if type(pipe).__name__.startswith("Wan") else "image"
    rs = RunningSet(pipe, adapter_for(pipe, {"kind": kind}).step_driver(pipe), shape, max_size)
    paused, outputs, steps_seen = {}, {}, {}
    tick = 0
    while True:
        # the jobs admitted at one boundary are prepared together, as the worker does
        rs.admit_many([arg for action, arg in script.get(tick, []) if action == "admit"])
        for action, arg in script.get(tick, []):
            if action == "cancel":
                rs.drop(arg)
            elif action == "pause":
                paused[arg] = rs.drop(arg)
            elif action == "resume":
                rs.resume(paused.pop(arg))
        if not rs.slots and not paused and tick > max(script):
            break
        finished = rs.step()
        for slot, out in zip(finished, rs.decode(finished)):
            assert slot.job.id not in outputs, "finished twice"
            outputs[slot.job.id] = out
            steps_seen[slot.job.id] = slot.done
        tick += 1
        assert tick < 200
    return outputs, steps_seen, rs


@pytest.mark.parametrize("kind", ["image", "video"])
def test_outputs_equal_standalone_whatever_joins_and_leaves(kind, image_pipe, video_pipe):
    pipe, shape = (image_pipe, IMAGE) if kind == "image" else (video_pipe, VIDEO)
    a, b, c, d = JOBS
    # a starts alone; b joins at step 1; c joins at 2 and d is canceled one step after joining;
    # a is paused for two steps and resumed.
    script = {0: [("admit", a)], 1: [("admit", b)], 2: [("admit", c), ("admit", d)], 3: [("cancel", "d"), ("pause", "a")],
              5: [("resume", "a")]}
    outputs, steps, rs = drive(pipe, shape, script)
    assert sorted(outputs) == ["a", "b", "c"]
    assert steps == {"a": 6, "b": 3, "c": 5}
    assert rs.shared["b"] >= {"a", "c"}  # b ran steps together with the others
    for job in (a, b, c):
        want = standalone(pipe, job, shape, kind)
        got = as_array(outputs[job.id], kind)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOL, f"{job.id}: max diff {np.abs(got - want).max()}"


@pytest.mark.parametrize("kind", ["image", "video"])
def test_jobs_finishing_at_the_same_step_are_decoded_together_and_equal_standalone(kind, image_pipe, video_pipe):
    pipe, shape = (image_pipe, IMAGE) if kind == "image" else (video_pipe, VIDEO)
    a, b, c, d = JOBS
    late = StepJob("late", d.prompt, seed=d.seed, steps=2, guidance=d.guidance)
    # b (3 steps) from step 0 and late (2 steps) from step 1 both finish at step 3: one decode of 2
    outputs, steps, _ = drive(pipe, shape, {0: [("admit", b)], 1: [("admit", late)]})
    assert steps == {"b": 3, "late": 2}
    for job in (b, late):
        diff = np.abs(as_array(outputs[job.id], kind) - standalone(pipe, job, shape, kind)).max()
        assert diff <= TOL, f"{job.id}: max diff {diff}"


@pytest.mark.parametrize("kind", ["image", "video"])
def test_jobs_joining_together_share_one_prompt_encoding_and_equal_standalone(kind, image_pipe, video_pipe):
    # a and d use guidance, c does not (its unconditional row is dropped), b has a negative prompt
    # where the others have none: one text-encoder call for all four, each output its own
    pipe, shape = (image_pipe, IMAGE) if kind == "image" else (video_pipe, VIDEO)
    calls = []
    encode = pipe.encode_prompt
    pipe.encode_prompt = lambda *a, **k: calls.append(a) or encode(*a, **k)
    try:
        outputs, steps, _ = drive(pipe, shape, {0: [("admit", job) for job in JOBS]})
    finally:
        del pipe.encode_prompt
    assert len(calls) == 1 and len(calls[0][0]) == 4
    assert steps == {j.id: j.steps for j in JOBS}
    for job in JOBS:
        diff = np.abs(as_array(outputs[job.id], kind) - standalone(pipe, job, shape, kind)).max()
        assert diff <= TOL, f"{job.id}: max diff {diff}"


def test_a_job_cannot_join_twice(image_pipe):
    rs = RunningSet(image_pipe, adapter_for(image_pipe, {"kind": "image"}).step_driver(image_pipe), IMAGE, 4)
    with pytest.raises(ValueError, match="already in the set"):
        rs.admit_many([JOBS[0], JOBS[0]])
    rs.admit(JOBS[1])
    with pytest.raises(ValueError, match="already in the set"):
        rs.admit(JOBS[1])
    assert list(rs.slots) == ["b"]


@pytest.mark.parametrize("kind", ["image", "video"])
def test_equality_is_not_vacuous(kind, image_pipe, video_pipe):
    # Negative control: another seed gives another output, so the equality above means something.
    pipe, shape = (image_pipe, IMAGE) if kind == "image" else (video_pipe, VIDEO)
    a = JOBS[0]
    other = StepJob("x", a.prompt, seed=99, steps=a.steps, guidance=a.guidance)
    outputs, _, _ = drive(pipe, shape, {0: [("admit", other)]})
    assert np.abs(as_array(outputs["x"], kind) - standalone(pipe, a, shape, kind)).max() > 0.05


def test_random_join_leave_cancel_pause_finishes_each_job_once_with_its_steps(image_pipe):
    rng = random.Random(7)
    for trial in range(3):
        jobs = [StepJob(f"t{trial}-{i}", "p", seed=i, steps=rng.choice([1, 2, 4]), guidance=rng.choice([1.0, 5.0]))
                for i in range(8)]
        script: dict[int, list] = {}
        canceled, paused_at = set(), {}
        for job in jobs:
            t = rng.randrange(0, 6)
            script.setdefault(t, []).append(("admit", job))
            r = rng.random()
            if r < 0.2:
                script.setdefault(t + 1 + rng.randrange(job.steps), []).append(("cancel", job.id))
                canceled.add(job.id)
            elif r < 0.4 and job.steps > 1:
                p = t + 1 + rng.randrange(job.steps - 1)
                script.setdefault(p, []).append(("pause", job.id))
                script.setdefault(p + rng.randrange(1, 3), []).append(("resume", job.id))
                paused_at[job.id] = p
        # a job canceled before its pause/resume would make those actions refer to nothing
        for jid in canceled & set(paused_at):
            canceled.discard(jid)
            for acts in script.values():
                acts[:] = [x for x in acts if not (x[0] == "cancel" and x[1] == jid)]
        outputs, steps, _ = drive(image_pipe, {"width": 16, "height": 16}, script, max_size=8)
        for job in jobs:
            if job.id in canceled:
                assert job.id not in outputs or steps[job.id] == job.steps
            else:
                assert steps[job.id] == job.steps, job.id
