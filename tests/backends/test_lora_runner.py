"""LoRA adapters applied per row in the real (tiny) demo image pipeline: an adapter changes the
output; a job's output with an adapter equals diffusers' own LoRA loading (PEFT) at the same scale;
a batch mixing 4 different adapters and a job without any runs as one call and each output equals
the job run alone (<= 2 levels of 8 bits, as the family tests), classifier-free guidance rows
included. Adapters are random PEFT adapters (tests/lora_adapters.py)."""
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from genserve.backends.demo import ensure_demo_model
from genserve.backends.runner import PipelineRunner
from genserve.storage import LocalResultStore
from tests.lora_adapters import save_adapter

pytestmark = pytest.mark.slow
PARAMS = {"width": 64, "height": 64, "num_frames": 0, "steps": 4, "guidance": 5.0, "fps": 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_model("image", tmp_path_factory.mktemp("models") / "demo-image")


@pytest.fixture(scope="module")
def adapters(demo, tmp_path_factory):
    """Five adapters of ranks 4..16 in the result store, by id; a kohya-layout one among them."""
    root = tmp_path_factory.mktemp("a")
    out = {}
    for i, rank in enumerate((4, 8, 16, 6, 4)):
        path = save_adapter(root / f"a{i}.safetensors", demo, rank=rank, seed=10 + i, amplitude=1.0,
                            layout="kohya" if i == 3 else "peft")
        out[f"a{i}"] = (hashlib.sha256(path.read_bytes()).hexdigest()[:16], path)
    return out


@pytest.fixture(scope="module")
def runner(demo, adapters, tmp_path_factory):
    store = LocalResultStore(tmp_path_factory.mktemp("results"))
    for lid, path in adapters.values():
        store.put("loras", f"{lid}.safetensors", path.read_bytes(), "application/octet-stream")
    r = PipelineRunner("cpu", store)
    r.load("demo", {"path": str(demo), "kind": "image", "dtype": "float32"})
    return r


def job(jid, seed, *loras):
    return {"id": jid, "prompt": "a red fox", "negative_prompt": None, "seed": seed,
            "loras": [{"name": n, "scale": s, "id": i} for n, s, i in loras] or None}


def run(runner, batch_id, *jobs, **params):
    events = []
    runner.run({"batch_id": batch_id, "model": "demo", "kind": "image", "params": {**PARAMS, **params},
                "jobs": list(jobs)}, events.append, set())
    return events


def pixels(runner, jid):
    return np.asarray(Image.open(io.BytesIO(runner.store.local_path(f"{jid}/output.png").read_bytes())), np.int16)


def lo(adapters, name, scale=1.0):
    return (name, scale, adapters[name][0])


def test_an_adapter_changes_the_output_and_reports_its_load(runner, adapters):
    run(runner, "b0", job("plain", 7))
    ev = run(runner, "b1", job("ink", 7, lo(adapters, "a0")))
    done = [e for e in ev if e["ev"] == "job_done"][0]
    assert done["lora_tiers"] == ["storage"] and done["lora_load_s"] > 0
    assert np.abs(pixels(runner, "plain") - pixels(runner, "ink")).max() > 10
    again = [e for e in run(runner, "b2", job("ink2", 7, lo(adapters, "a0"))) if e["ev"] == "job_done"][0]
    assert again["lora_tiers"] == ["device"]  # resident now: a hit
    assert np.array_equal(pixels(runner, "ink"), pixels(runner, "ink2"))  # same seed, same adapter: same bytes


def test_matches_diffusers_lora_loading(runner, adapters, demo):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    run(runner, "b3", job("ours", 3, lo(adapters, "a1", 0.7)))
    pipe = StableDiffusionPipeline.from_pretrained(demo, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights({f"unet.{k}": v for k, v in load_file(str(adapters["a1"][1])).items()}, adapter_name="a1")
    with torch.inference_mode():
        ref = pipe(["a red fox"], width=64, height=64, num_inference_steps=4, guidance_scale=5.0,
                   generator=[torch.Generator("cpu").manual_seed(3)], cross_attention_kwargs={"scale": 0.7}).images[0]
    assert np.abs(pixels(runner, "ours") - np.asarray(ref, np.int16)).max() <= 2


@pytest.mark.parametrize("guidance", [5.0, 1.0])  # with classifier-free guidance rows, and without
def test_a_mixed_batch_equals_each_job_alone(runner, adapters, guidance):
    g = int(guidance)
    jobs = [job(f"m{g}-0", 1, lo(adapters, "a0")), job(f"m{g}-1", 2, lo(adapters, "a1", -0.5)),
            job(f"m{g}-2", 3), job(f"m{g}-3", 4, lo(adapters, "a2", 1.5), lo(adapters, "a3", 0.5)),
            job(f"m{g}-4", 5, lo(adapters, "a4"))]
    ev = run(runner, f"mix{g}", *jobs, guidance=guidance)
    assert sum(e["ev"] == "started" for e in ev) == 1 and sum(e["ev"] == "job_done" for e in ev) == 5
    assert [e["total"] for e in ev if e["ev"] == "progress"][-1] == PARAMS["steps"]  # one call, not one per adapter
    for j in jobs:
        alone = dict(j, id=j["id"] + "-alone")
        run(runner, "solo-" + j["id"], alone, guidance=guidance)
        diff = np.abs(pixels(runner, j["id"]) - pixels(runner, alone["id"])).max()
        assert diff <= 2, (j["id"], diff)


def test_step_level_set_with_different_adapters(runner, adapters):
    """A running set whose jobs carry different adapters (and one joins between steps): each job's
    output equals its request-level output alone."""
    import queue

    from genserve.backends.step_runner import run_steps

    jobs = [dict(job("s0", 11, lo(adapters, "a0")), steps=4, guidance=5.0),
            dict(job("s1", 12), steps=3, guidance=1.0),
            dict(job("s2", 13, lo(adapters, "a2", 0.8), lo(adapters, "a3", -1.0)), steps=4, guidance=3.0)]
    late = dict(job("s3", 14, lo(adapters, "a1")), steps=2, guidance=5.0)
    joins: queue.Queue = queue.Queue()
    events: list = []

    def on_step(i):
        if i == 0:
            joins.put({"batch_id": "st", "jobs": [late]})

    run_steps(runner, {"batch_id": "st", "model": "demo", "kind": "image", "params": PARAMS, "jobs": jobs},
              events.append, set(), joins, set(), on_step, 8)
    done = {e["job_id"]: e for e in events if e["ev"] == "job_done"}
    assert set(done) == {"s0", "s1", "s2", "s3"} and done["s3"]["step"]["joined_step"] == 1
    assert done["s0"]["lora_tiers"] and "lora_tiers" not in done["s1"]
    for j in [*jobs, late]:
        alone = dict(j, id=j["id"] + "-alone")
        run(runner, "solo-" + j["id"], alone, steps=j["steps"], guidance=j["guidance"])
        diff = np.abs(pixels(runner, j["id"]) - pixels(runner, alone["id"])).max()
        assert diff <= 2, (j["id"], diff)
