"""compile = "regional" on the demo video model's transformer (one small shape; torch.compile on a
CPU is slow, hence slow-marked): compiled at load (counted in the load), outputs as eager ones, a
batch size the warm-up did not see does not recompile per request, and a restarted worker process
compiles from the on-disk cache under the data dir. ``quantize`` and bad backends refuse the load."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from genserve.backends.demo import ensure_demo_model
from genserve.backends.families import UnsupportedPipeline
from genserve.backends.runner import PipelineRunner
from genserve.storage import LocalResultStore

pytestmark = pytest.mark.slow

SHAPE = {"width": 32, "height": 32, "num_frames": 5}


def raw(kind, output, fps, **_):
    return np.asarray(output, dtype=np.float32).tobytes()


def spec(path, cache_dir, mode):
    return {"path": str(path), "kind": "video", "dtype": "float32", "compile": mode, "compile_cache_dir": str(cache_dir),
            "warmup": {**SHAPE, "guidance": 1.0, "batch_sizes": [1, 2]}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ensure_demo_model("video", tmp_path_factory.mktemp("models") / "demo-video")


def run(r, model_name, seeds):
    events = []
    jobs = [{"id": f"{model_name}-{s}-{len(seeds)}", "prompt": "waves", "negative_prompt": None, "seed": s} for s in seeds]
    r.run({"batch_id": "b", "model": model_name, "kind": "video", "params": {**SHAPE, "steps": 2, "guidance": 1.0,
                                                                              "fps": 8}, "jobs": jobs}, events.append, set())
    return {int(e["job_id"].split("-")[1]): (np.frombuffer(r.store.read(e["result"]["key"]), dtype=np.float32),
                                             e["execution"]) for e in events if e["ev"] == "job_done"}


def test_regional_compile_at_load_matches_eager_and_does_not_recompile_per_batch(model, tmp_path):
    torch.set_num_threads(2)
    r = PipelineRunner("cpu", LocalResultStore(tmp_path / "results"), encode=raw)
    eager = run_loaded(r, "eager", {"path": str(model), "kind": "video", "dtype": "float32"}, [1, 2, 3])
    info = r.load("compiled", spec(model, tmp_path / "cc", "regional"))
    assert info["compiled"] == "regional" and info["compiles"] > 0 and info["compile_s"] > 0
    assert info["load_end"] - info["load_start"] >= info["compile_s"]  # compile is part of the cold start
    got = run(r, "compiled", [1, 2, 3])  # batch size 3: not warmed up; the batch dimension is dynamic by now
    assert r.compiles == 0
    run(r, "compiled", [4])
    assert r.compiles == 0
    for s in (1, 2, 3):
        assert got[s][1]["compiled"] == "regional" and eager[s][1]["compiled"] is None
        assert np.abs(got[s][0] - eager[s][0]).max() * 255 <= 2
    assert any((tmp_path / "cc").rglob("*"))  # the compiler's cache is under the given directory

    # A restarted worker: a fresh process with the same cache directory compiles from it.
    code = textwrap.dedent(f"""
        import json, torch
        from torch._dynamo.utils import counters
        from genserve.backends.runner import PipelineRunner
        from genserve.storage import LocalResultStore
        torch.set_num_threads(2)
        r = PipelineRunner("cpu", LocalResultStore({str(tmp_path / 'results2')!r}))
        info = r.load("m", {json.dumps(spec(model, tmp_path / 'cc', 'regional'))})
        print(json.dumps({{"hits": counters["inductor"]["fxgraph_cache_hit"],
                          "misses": counters["inductor"]["fxgraph_cache_miss"], "compile_s": info["compile_s"]}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    again = json.loads(out.stdout.strip().splitlines()[-1])
    assert again["hits"] > 0 and again["misses"] == 0, again


def run_loaded(r, name, s, seeds):
    r.load(name, s)
    return run(r, name, seeds)


def test_quantize_and_unavailable_attention_backends_refuse_the_load(model, tmp_path):
    r = PipelineRunner("cpu", LocalResultStore(tmp_path / "results"))
    base = {"path": str(model), "kind": "video", "dtype": "float32"}
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedPipeline, match="quantize"):
            r.load("q", {**base, "quantize": "float8"})
        with pytest.raises(UnsupportedPipeline, match="attention_backend"):
            r.load("a", {**base, "attention_backend": "flash"})
    assert r.load("n", {**base, "attention_backend": "native"})["compiled"] is None and "n" in r.pipes
    assert "q" not in r.pipes and "a" not in r.pipes
