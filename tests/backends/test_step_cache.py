"""Per-request step caches (genserve/backends/step_cache.py) through the request-level runner on the
real demo pipelines: a batch with a cache gives each job what it gets alone with it (within 2
levels of 8 bits), the cache changes the computation (it is not a no-op), the steps it reused are
counted, and the pipeline is left as it was."""
import numpy as np
import pytest
import torch

from genserve.backends.demo import ensure_demo_model
from genserve.backends.runner import PipelineRunner
from genserve.backends.step_cache import UnsupportedCache
from genserve.storage import LocalResultStore

pytestmark = pytest.mark.slow

TOL = 2.0  # levels of 8 bits
DEEP = {"method": "deep", "interval": 3}
FIRST_BLOCK = {"method": "first_block", "threshold": 0.2}
TAYLORSEER = {"method": "taylorseer", "interval": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def raw(kind, output, fps, **_):
    return np.asarray(output, dtype=np.uint8 if kind == "image" else np.float32).tobytes()


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    r = PipelineRunner("cpu", LocalResultStore(tmp_path_factory.mktemp("results")), encode=raw)
    for kind in ("image", "video"):
        r.load(kind, {"path": str(ensure_demo_model(kind, root / f"demo-{kind}")), "kind": kind, "dtype": "float32"})
    return r


def run(r, kind, seeds, cache, steps=6, guidance=1.0):
    """{seed: (output in levels of 8 bits, execution)} of one batch, one job per seed."""
    events = []
    params = {"width": 32, "height": 32, "num_frames": 5 if kind == "video" else 0, "steps": steps,
              "guidance": guidance, "fps": 8}
    jobs = [{"id": f"{kind}-{s}-{len(seeds)}", "prompt": f"prompt {s}", "negative_prompt": None, "seed": s,
             "cache": cache} for s in seeds]
    r.run({"batch_id": "b", "model": kind, "kind": kind, "params": params, "jobs": jobs}, events.append, set())
    out = {}
    for e in (e for e in events if e["ev"] == "job_done"):
        data = np.frombuffer(r.store.read(e["result"]["key"]), dtype=np.uint8 if kind == "image" else np.float32)
        out[int(e["job_id"].split("-")[1])] = (data.astype(np.float64) * (1 if kind == "image" else 255), e["execution"])
    return out


@pytest.mark.parametrize("kind,cache,guidance", [("image", DEEP, 1.0), ("image", DEEP, 5.0),
                                                 ("video", FIRST_BLOCK, 1.0), ("video", TAYLORSEER, 3.0)])
def test_a_batch_with_a_cache_equals_lone_jobs_with_it(runner, kind, cache, guidance):
    batch = run(runner, kind, [1, 2, 3], cache, guidance=guidance)
    for seed in (1, 3):
        lone = run(runner, kind, [seed], cache, guidance=guidance)[seed]
        assert np.abs(lone[0] - batch[seed][0]).max() <= TOL, (seed, np.abs(lone[0] - batch[seed][0]).max())
        same = ("cache", "steps_computed", "steps_reused")
        assert [lone[1][k] for k in same] == [batch[seed][1][k] for k in same]
    plain = run(runner, kind, [1], None, guidance=guidance)[1]
    assert np.abs(plain[0] - batch[1][0]).mean() > 0  # the cache changed the computation
    ex = batch[1][1]
    assert ex["cache"] == cache and ex["steps_reused"] > 0 and ex["steps_computed"] + ex["steps_reused"] == 6
    assert plain[1]["cache"] is None and (plain[1]["steps_computed"], plain[1]["steps_reused"]) == (6, 0)


def test_deep_cache_schedule_is_every_interval_th_step(runner):
    ex = run(runner, "image", [4], {"method": "deep", "interval": 2}, steps=5)[4][1]
    assert (ex["steps_computed"], ex["steps_reused"]) == (3, 2)  # full at steps 0, 2, 4
    ex = run(runner, "image", [4], DEEP, steps=6)[4][1]
    assert (ex["steps_computed"], ex["steps_reused"]) == (2, 4)  # full at steps 0 and 3


def test_the_pipeline_is_left_as_it_was(runner):
    before = {kind: run(runner, kind, [5], None, steps=3)[5][0] for kind in ("image", "video")}
    run(runner, "image", [5], DEEP, steps=3)
    run(runner, "video", [5], FIRST_BLOCK, steps=3)
    run(runner, "video", [5], TAYLORSEER, steps=3)
    for kind in ("image", "video"):
        assert np.array_equal(run(runner, kind, [5], None, steps=3)[5][0], before[kind])
    unet, transformer = runner.pipes["image"].unet, runner.pipes["video"].transformer
    # diffusers' hook registry leaves the class's own forward bound on the instance; nothing else may stay
    left = [m for m in (*unet.modules(), *transformer.modules()) if "forward" in m.__dict__]
    assert all(getattr(m.__dict__["forward"], "__func__", None) is type(m).forward for m in left)
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert not unet._forward_pre_hooks and not transformer._forward_pre_hooks
    assert not transformer.is_cache_enabled


def test_a_cache_the_pipeline_has_no_denoiser_for_is_refused(runner):
    with pytest.raises(UnsupportedCache):
        run(runner, "video", [1], DEEP, steps=2)
    with pytest.raises(UnsupportedCache):
        run(runner, "image", [1], FIRST_BLOCK, steps=2)



@pytest.mark.parametrize("family,cache", [("sdxl", DEEP), ("flux-dev", TAYLORSEER)])
def test_the_other_families_caches_batch_like_lone_jobs(family_models, tmp_path, family, cache):
    """SDXL's UNet takes the deep cache, FLUX's transformer diffusers' hooks (tiny checkpoints)."""
    r = PipelineRunner("cpu", LocalResultStore(tmp_path / "results"), encode=raw)
    r.load("image", {"path": str(family_models[family]), "kind": "image", "dtype": "float32"})
    guidance = 5.0 if family == "sdxl" else 3.5
    batch = run(r, "image", [1, 2], cache, guidance=guidance)
    lone = run(r, "image", [1], cache, guidance=guidance)[1]
    plain = run(r, "image", [1], None, guidance=guidance)[1]
    assert np.abs(lone[0] - batch[1][0]).max() <= TOL
    assert lone[1]["steps_reused"] == batch[1][1]["steps_reused"] > 0
    assert np.abs(plain[0] - lone[0]).mean() > 0
