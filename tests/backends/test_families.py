"""Every supported family through PipelineRunner, on tiny random-weight checkpoints built with the
real diffusers classes (tests/family_models.py): sizes, batch equivalence, negative prompts, and
what is refused at load.

Equivalence tolerance: a job's uint8 output alone and batched may differ by at most 1 level (out
of 255) per pixel: batching changes float summation order (~1e-7 here), which can flip a rounding.
Outputs are compared before PNG / MP4 encoding (H.264 is lossy and would amplify such a flip).
"""
import io

import numpy as np
import pytest

from genserve.backends.encode import to_uint8_frames
from genserve.backends.families import UnsupportedPipeline, adapter_for, inspect_model_dir
from genserve.backends.runner import OutputMismatch, PipelineRunner, check_output
from genserve.storage import LocalResultStore

from .family_helpers import diff, job, run_batch, sample_image

pytestmark = pytest.mark.slow

TOLERANCE = 1  # uint8 levels
# name -> (model directory, spec options)
SERVED = {
    "sd": ("sd", {}),
    "sdxl": ("sdxl", {}),
    "sdxl-nozeros": ("sdxl-nozeros", {}),
    "flux-dev": ("flux-dev", {"true_cfg_scale": 4.0, "max_sequence_length": 16}),
    "flux-dev-plain": ("flux-dev", {"max_sequence_length": 16}),
    "flux-schnell": ("flux-schnell", {"max_sequence_length": 16}),
    "sd3": ("sd3", {"max_sequence_length": 16}),
    "wan": ("wan", {"max_sequence_length": 16}),
    "wan-i2v": ("wan-i2v", {"max_sequence_length": 16}),
}
NEGATIVE_HONOURED = ["sd", "sdxl", "sdxl-nozeros", "flux-dev", "sd3", "wan", "wan-i2v"]


def raw_encode(kind, output, fps):
    """Store the uint8 pixels themselves (npy), so outputs compare exactly."""
    arr = np.asarray(output.convert("RGB")) if kind == "image" else to_uint8_frames(output)
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runner(family_models, tmp_path_factory):
    r = PipelineRunner("cpu", LocalResultStore(tmp_path_factory.mktemp("family-results")), encode=raw_encode)
    for name, (d, opts) in SERVED.items():
        t = inspect_model_dir(family_models[d])
        r.load(name, {"path": str(family_models[d]), "kind": t.kind, "dtype": "float32", **opts})
    return r


def kind_of(runner, name):
    return runner.adapters[name].traits.kind


def out(runner, jid):
    name = "output.png" if runner.store.exists(f"{jid}/output.png") else "output.mp4"
    return np.load(io.BytesIO(runner.store.local_path(f"{jid}/{name}").read_bytes()))


def img_for(runner, name):
    return sample_image() if runner.adapters[name].traits.image_input else None


def levels(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("name", list(SERVED))
def test_single_job_and_batch_of_4_have_the_requested_size(runner, name):
    kind, im = kind_of(runner, name), img_for(runner, name)
    frames = 9 if kind == "video" else 0
    events, peak = run_batch(runner, name, kind, [job(f"{name}-one", 1, image=im)], width=48, height=32,
                             num_frames=frames)
    batch = [job(f"{name}-four{i}", 10 + i, image=im) for i in range(4)]
    events += run_batch(runner, name, kind, batch, width=48, height=32, num_frames=frames)[0]
    done = [e["job_id"] for e in events if e["ev"] == "job_done"]
    assert done == [f"{name}-one"] + [j["id"] for j in batch]
    want = (frames, 32, 48, 3) if kind == "video" else (32, 48, 3)
    for jid in done:
        assert out(runner, jid).shape == want
    assert peak == 0  # CPU: nothing measured
    msg = {"model": name, "params": {"width": 48, "height": 32, "num_frames": frames, "guidance": 3.0}, "jobs": batch}
    assert runner.estimated_bytes(msg) > 0  # the family's estimate, sent as a hint


@pytest.mark.parametrize("name", list(SERVED))
def test_output_alone_equals_output_batched_with_other_negative_prompts(runner, name):
    kind, im = kind_of(runner, name), img_for(runner, name)
    honours = name in NEGATIVE_HONOURED
    mates = [job(f"{name}-m1", 1, "blurry" if honours else None, image=im),
             job(f"{name}-m2", 2, "" if honours else None, image=im),
             job(f"{name}-m3", 3, prompt="a blue bird", image=im)]
    run_batch(runner, name, kind, [job(f"{name}-alone", 5, image=im)])
    run_batch(runner, name, kind, [mates[0], job(f"{name}-in", 5, image=im), *mates[1:]])
    assert levels(out(runner, f"{name}-alone"), out(runner, f"{name}-in")) <= TOLERANCE
    if honours:  # and the job *with* a negative prompt, alone vs batched
        run_batch(runner, name, kind, [job(f"{name}-m1-alone", 1, "blurry", image=im)])
        assert levels(out(runner, f"{name}-m1-alone"), out(runner, f"{name}-m1")) <= TOLERANCE


@pytest.mark.parametrize("name", NEGATIVE_HONOURED)
def test_a_negative_prompt_changes_the_output(runner, name):
    kind, im = kind_of(runner, name), img_for(runner, name)
    run_batch(runner, name, kind, [job(f"{name}-plain", 7, image=im)])
    run_batch(runner, name, kind, [job(f"{name}-neg", 7, "blurry, low quality", image=im)])
    assert levels(out(runner, f"{name}-plain"), out(runner, f"{name}-neg")) > 2 * TOLERANCE


def test_flux_without_true_cfg_ignores_negative_prompts(runner):
    """Why genserve refuses them for such a model (the server at submit, the worker as a last
    check): diffusers drops them silently."""
    import torch

    pipe = runner.pipes["flux-dev-plain"]

    def go(**kw):
        return np.asarray(pipe(prompt="a red fox", width=32, height=32, num_inference_steps=2, max_sequence_length=16,
                               generator=torch.Generator().manual_seed(7), **kw).images[0])

    assert levels(go(), go(negative_prompt="blurry")) == 0


def test_sdxl_mixed_batch_runs_as_two_calls_and_one_call_would_be_wrong(runner):
    """The bug of the issue: None turned into "" for the whole batch changes an SDXL job's output
    (force_zeros_for_empty_prompt). The runner splits such a batch into one call per group."""
    import torch

    events, _ = run_batch(runner, "sdxl", "image", [job("sx-a", 5), job("sx-b", 6, "blurry")], steps=2)
    assert [e["total"] for e in events if e["ev"] == "progress"] == [4, 4, 4, 4]  # 2 calls × 2 steps
    run_batch(runner, "sdxl", "image", [job("sx-alone", 5)], steps=2)
    assert levels(out(runner, "sx-alone"), out(runner, "sx-a")) <= TOLERANCE
    pipe = runner.pipes["sdxl"]
    naive = pipe(prompt=["a red fox"] * 2, negative_prompt=["", "blurry"], width=32, height=32, num_inference_steps=2,
                 guidance_scale=3.0, generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images[0]
    assert levels(out(runner, "sx-alone"), np.asarray(naive)) > 2 * TOLERANCE


def test_the_wan_i2v_image_conditions_the_video(runner):
    from PIL import Image

    from genserve.backends.image_input import data_url

    black, white = (data_url(Image.new("RGB", (64, 48), c)) for c in ((0, 0, 0), (255, 255, 255)))
    run_batch(runner, "wan-i2v", "video", [job("i2v-a", 3, image=black)])
    run_batch(runner, "wan-i2v", "video", [job("i2v-b", 3, image=white)])
    assert levels(out(runner, "i2v-a"), out(runner, "i2v-b")) > 2 * TOLERANCE
    # different images in one batch: one call per image (2 calls × 2 steps), each as alone
    events, _ = run_batch(runner, "wan-i2v", "video", [job("i2v-c", 3, image=white), job("i2v-d", 3, image=black)])
    assert [e["total"] for e in events if e["ev"] == "progress"] == [4, 4, 4, 4]
    assert levels(out(runner, "i2v-b"), out(runner, "i2v-c")) <= TOLERANCE
    assert levels(out(runner, "i2v-a"), out(runner, "i2v-d")) <= TOLERANCE


def test_output_checks_name_the_mismatch():
    from PIL import Image

    check_output("image", Image.new("RGB", (32, 48)), 32, 48, 0)
    with pytest.raises(OutputMismatch, match="asked for 72x64, the pipeline returned 64x64"):
        check_output("image", Image.new("RGB", (64, 64)), 72, 64, 0)
    check_output("video", np.zeros((9, 32, 48, 3)), 48, 32, 9)
    with pytest.raises(OutputMismatch, match="asked for 9 frames"):
        check_output("video", np.zeros((8, 32, 48, 3)), 48, 32, 9)
    assert OutputMismatch.genserve_code == "output_mismatch"


def test_load_refuses_what_cannot_be_served(family_models, tmp_path):
    r = PipelineRunner("cpu", LocalResultStore(tmp_path))
    with pytest.raises(UnsupportedPipeline, match="makes images"):
        r.load("x", {"path": str(family_models["sd3"]), "kind": "video", "dtype": "float32"})
    with pytest.raises(UnsupportedPipeline, match="true_cfg_scale"):
        r.load("x", {"path": str(family_models["sd3"]), "kind": "image", "dtype": "float32", "true_cfg_scale": 3.0})
    assert r.pipes == {} and r.adapters == {}


def test_load_refuses_a_config_whose_sizes_the_model_cannot_produce(family_models, tmp_path):
    """A source the server could not read at start-up (s3://, a Hugging Face id) keeps the default
    size_multiple of 8; the worker compares it with the loaded pipeline's own and fails the load
    naming the key, instead of SD3 failing every 72x64 job `internal` and FLUX rounding it."""
    r = PipelineRunner("cpu", LocalResultStore(tmp_path))
    for name in ("sd3", "flux-dev"):
        with pytest.raises(UnsupportedPipeline, match="size_multiple = 8: .* multiples of 16"):
            r.load("x", {"path": str(family_models[name]), "kind": "image", "dtype": "float32", "size_multiple": 8})
    with pytest.raises(UnsupportedPipeline, match="frame_stride = 2: .* multiple of 4"):
        r.load("x", {"path": str(family_models["wan"]), "kind": "video", "dtype": "float32", "size_multiple": 16,
                     "frame_stride": 2})
    assert r.pipes == {} and r.adapters == {}
    # a multiple of the model's own values is fine
    r.load("ok", {"path": str(family_models["wan"]), "kind": "video", "dtype": "float32", "size_multiple": 32,
                  "frame_stride": 8})
    assert "ok" in r.pipes


def test_the_worker_refuses_sizes_the_pipeline_cannot_produce(runner):
    """SD3's positional embedding covers pos_embed_max_size × patch × VAE scale pixels (128 for
    the tiny model): beyond it diffusers raises at run time (`internal`); the worker refuses it
    first with invalid_request (not retried), as for a size that is not a multiple."""
    from genserve.backends.runner import UnsupportedSize
    from genserve.engine.types import ErrorCode, classify_exception

    with pytest.raises(UnsupportedSize, match="covers sides up to 128") as e:
        run_batch(runner, "sd3", "image", [job("us-a", 1)], width=144, height=32)
    assert classify_exception(e.value) == ErrorCode.INVALID_REQUEST
    with pytest.raises(UnsupportedSize, match="multiples of 16"):
        run_batch(runner, "flux-dev", "image", [job("us-b", 1)], width=72, height=64)
    assert not runner.store.exists("us-a/output.png") and not runner.store.exists("us-b/output.png")


def test_a_pipeline_that_rounds_the_size_fails_the_job_output_mismatch(runner):
    """The issue's FLUX 72x64 case as the last line of defence sees it: a FLUX pipeline genserve
    does not recognise (generic adapter: size multiple 8 from the VAE, unaware of the 2x2 packing)
    rounds 72x64 down to 64x64; the job fails with output_mismatch and no output is written."""
    from diffusers import FluxPipeline

    from genserve.engine.types import ErrorCode, classify_exception

    class MyFlux(FluxPipeline):
        pass

    runner.pipes["my-flux"] = MyFlux(**runner.pipes["flux-dev-plain"].components)
    runner.adapters["my-flux"] = adapter_for(runner.pipes["my-flux"], {"kind": "image", "max_sequence_length": 16})
    assert runner.adapters["my-flux"].traits.size_multiple == 8
    with pytest.raises(OutputMismatch, match="asked for 72x64, the pipeline returned 64x64") as e:
        run_batch(runner, "my-flux", "image", [job("mm-a", 1)], width=72, height=64, guidance=3.5)
    assert classify_exception(e.value) == ErrorCode.OUTPUT_MISMATCH
    assert not runner.store.exists("mm-a/output.png")


class NeedsAMask:
    """A pipeline (as far as genserve can tell) with a required input genserve cannot supply."""

    components: dict = {}

    def __call__(self, prompt, mask_image, guidance_scale: float = 5.0):
        raise AssertionError("never called")


def test_required_inputs_genserve_cannot_supply_are_refused():
    with pytest.raises(UnsupportedPipeline, match="requires inputs genserve cannot supply: mask_image"):
        adapter_for(NeedsAMask(), {"kind": "image"})


def test_generic_fallback_from_the_call_signature(runner):
    from diffusers import StableDiffusionXLPipeline

    class MyXLPipeline(StableDiffusionXLPipeline):  # a class no family module knows
        pass

    pipe = MyXLPipeline(**runner.pipes["sdxl"].components)
    a = adapter_for(pipe, {"kind": "image"})
    t = a.traits
    assert (t.family, t.size_multiple, t.negative, t.guidance, t.true_cfg, t.image_input) == (
        "generic", 8, "cfg", "cfg", False, False)
    assert a.group_key({"negative_prompt": None}) != a.group_key({"negative_prompt": ""})  # unknown: kept apart
    params = {"width": 32, "height": 32, "steps": 2, "guidance": 3.0}
    kw = a.call_kwargs([{"prompt": "x", "negative_prompt": "y"}], params)
    assert kw == {"prompt": ["x"], "width": 32, "height": 32, "num_inference_steps": 2, "guidance_scale": 3.0,
                  "negative_prompt": ["y"]}


def test_the_worker_refuses_inputs_a_generic_pipeline_would_ignore(runner):
    """For pipelines no family knows, the server could not check requests: the worker does."""
    from diffusers import StableDiffusion3Pipeline

    from genserve.backends.runner import IgnoredInput

    class MySD3(StableDiffusion3Pipeline):
        pass

    runner.pipes["my-sd3"] = MySD3(**runner.pipes["sd3"].components)
    runner.adapters["my-sd3"] = adapter_for(runner.pipes["my-sd3"], {"kind": "image", "max_sequence_length": 16})
    assert runner.adapters["my-sd3"].traits.size_multiple == 16  # VAE 8 × the transformer's 2×2 patches
    with pytest.raises(IgnoredInput, match="would ignore negative_prompt"):
        run_batch(runner, "my-sd3", "image", [job("ig-a", 1, "blurry")], guidance=1.0)
    with pytest.raises(IgnoredInput, match="would ignore image"):
        run_batch(runner, "my-sd3", "image", [job("ig-b", 1, image=sample_image())])
    assert not runner.store.exists("ig-a/output.png")
    run_batch(runner, "my-sd3", "image", [job("ig-c", 1, "blurry")], guidance=3.0)  # honoured: runs
    assert out(runner, "ig-c").shape == (32, 32, 3)


def test_sdxl_turbo_style_no_cfg_one_step(runner):
    """Turbo-style serving of an SDXL checkpoint: guidance 0, one step, no negative prompts."""
    batch = [job(f"tb{i}", 20 + i, prompt=f"prompt {i}") for i in range(4)]
    events, _ = run_batch(runner, "sdxl", "image", batch, guidance=0.0, steps=1, width=64, height=48)
    assert [e["total"] for e in events if e["ev"] == "progress"] == [1]  # one call, one step
    run_batch(runner, "sdxl", "image", [job("tb-alone", 22, prompt="prompt 2")], guidance=0.0, steps=1,
              width=64, height=48)
    assert out(runner, "tb2").shape == (48, 64, 3)
    assert levels(out(runner, "tb-alone"), out(runner, "tb2")) <= TOLERANCE


def test_a_call_group_canceled_before_it_starts_is_skipped(runner):
    p = {"width": 32, "height": 32, "num_frames": 0, "steps": 2, "guidance": 3.0, "fps": 8}
    msg = {"batch_id": "cg", "model": "sdxl", "kind": "image", "params": p,
           "jobs": [job("cg-a", 1), job("cg-b", 2, "blurry")]}
    events: list[dict] = []
    runner.run(msg, events.append, {"cg-b"})
    kinds = [(e["ev"], e.get("job_id") or e.get("step")) for e in events]
    # cg-b's call never runs: only cg-a's two steps are reported (of the batch's four)
    assert kinds == [("job_canceled", "cg-b"), ("started", None), ("progress", 1), ("progress", 2),
                     ("job_done", "cg-a")]
    assert not runner.store.exists("cg-b/output.png")


# ---- step-level batching over the family adapters (backends/stepping.py, step_runner.py) ---------


def test_step_drivers_exist_for_sd_and_wan_text_to_video_only_among_these_families(runner):
    # (the SD 1.x/2.x demo model's driver is tested in tests/backends/test_stepping.py)
    drivers = {name: runner.adapters[name].step_driver(runner.pipes[name]) for name in SERVED}
    assert {n for n, d in drivers.items() if d is not None} == {"sd", "wan"}


def step_msg(model, kind, jobs):
    params = {"width": 32, "height": 32, "num_frames": 5 if kind == "video" else 0, "steps": 0, "guidance": 0.0,
              "fps": 8}
    return {"batch_id": f"s-{jobs[0]['id']}", "model": model, "kind": kind, "params": params, "jobs": jobs,
            "mode": "step", "max_size": 4}


def test_wan_step_mode_outputs_equal_request_level_runs(runner):
    import queue

    from genserve.backends.step_runner import run_steps

    jobs = [dict(job("ws1", 1), steps=2, guidance=3.0), dict(job("ws2", 2, negative="blurry"), steps=3, guidance=4.0)]
    events: list[dict] = []
    run_steps(runner, step_msg("wan", "video", jobs), events.append, set(), queue.Queue(), set(), max_size=4)
    assert {e["job_id"] for e in events if e["ev"] == "job_done"} == {"ws1", "ws2"}
    for j, alone in zip(jobs, ("wr1", "wr2")):
        run_batch(runner, "wan", "video", [dict(job(alone, j["seed"], negative=j["negative_prompt"]))],
                  steps=j["steps"], guidance=j["guidance"])
        assert diff(out(runner, j["id"]), out(runner, alone)) <= 1


def test_step_mode_without_a_driver_runs_one_request_level_call_per_steps_and_guidance(runner):
    from genserve.backends.step_runner import run_grouped

    jobs = [dict(job("g1", 1), steps=1, guidance=3.0), dict(job("g2", 2), steps=2, guidance=3.0)]
    events: list[dict] = []
    run_grouped(runner, step_msg("sdxl", "image", jobs), events.append, set())
    assert {e["job_id"] for e in events if e["ev"] == "job_done"} == {"g1", "g2"}
    for j, alone in zip(jobs, ("gr1", "gr2")):
        run_batch(runner, "sdxl", "image", [job(alone, j["seed"])], steps=j["steps"], guidance=j["guidance"])
        assert diff(out(runner, j["id"]), out(runner, alone)) <= 1


def test_runtime_packages_of_the_families_are_declared_and_checked_at_load(runner, monkeypatch):
    """Wan's pipelines clean prompts with ftfy, imported only if installed (a NameError per job
    otherwise): it is a declared dependency, and a worker without it fails the load saying so."""
    import tomllib
    from pathlib import Path

    from genserve.backends import families

    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    for mod in set(families.FAMILIES.values()):
        for pkg in getattr(mod, "PACKAGES", ()):
            assert any(d.split(">")[0].split("=")[0].split("[")[0].strip() == pkg for d in deps), pkg
    assert families.wan.PACKAGES == ("ftfy",)
    assert families.missing_packages(("ftfy", "genserve_no_such_package")) == ["genserve_no_such_package"]
    # a worker environment without the package: the load fails naming it (model_load_failed)
    monkeypatch.setattr(families.wan, "PACKAGES", ("genserve_no_such_package",))
    with pytest.raises(UnsupportedPipeline, match="needs the Python package.* genserve_no_such_package"):
        adapter_for(runner.pipes["wan"], {"kind": "video"})
