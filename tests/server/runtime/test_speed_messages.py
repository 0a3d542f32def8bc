"""What the runtime tells workers about the speed levers (server/runtime/messages.py): the load
spec carries the prompt cache, compile mode, its cache directory under the data dir and the
warm-up shapes; a run of a step-mode model with a step cache is a request-level batch."""
from genserve.config.load import parse_config
from genserve.engine.types import LoadModel, RunBatch
from genserve.server.requests import validate
from genserve.server.runtime.messages import load_message, run_message


def config(**keys):
    table = {"kind": "image", "source": "demo:image", "max_batch_size": 6, "default_size": "64x64",
             "batching": "step", **keys}
    return parse_config({"server": {"data_dir": "/srv/gs"}, "models": {"m": table}})


def test_the_load_spec_carries_the_levers():
    spec = load_message(config(compile="regional", prompt_cache_bytes=1024), LoadModel("w0", "m"))["spec"]
    assert spec["compile"] == "regional" and spec["prompt_cache_bytes"] == 1024
    assert spec["compile_cache_dir"] == "/srv/gs/compile-cache"
    assert spec["warmup"] == {"width": 64, "height": 64, "guidance": 5.0, "num_frames": 0, "batch_sizes": [1, 6]}
    plain = load_message(config(), LoadModel("w0", "m"))["spec"]
    assert plain["compile"] == "off" and "warmup" not in plain and plain["prompt_cache_bytes"] == 64 << 20


def test_a_batch_with_a_step_cache_runs_at_request_level_on_a_step_model():
    cfg = config(caches=["deep"])
    job = validate({"model": "m", "prompt": "x", "cache": {"method": "deep"}}, cfg.models, random_seed=1)
    plain = validate({"model": "m", "prompt": "x"}, cfg.models, random_seed=1)
    records = [{"id": "j", "params": job.to_dict()}]
    msg = run_message(cfg, RunBatch("b", "w0", job.key, ("j",)), records)
    assert "mode" not in msg and msg["jobs"][0]["cache"] == {"method": "deep", "interval": 3}
    assert run_message(cfg, RunBatch("b", "w0", plain.key, ("j",)), [{"id": "j", "params": plain.to_dict()}])["mode"] == "step"
