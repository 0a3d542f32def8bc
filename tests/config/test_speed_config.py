"""The speed levers in a model's table (prompt_cache_bytes, caches, default_cache, compile,
attention_backend, quantize) and a request's ``cache``, checked against the model's family."""
import pytest

from genserve.backends.families.speed import cuda_available
from genserve.engine.types import ModelLimits

from .test_family_config import config_error, dirs, models, refused, req  # noqa: F401 (dirs: a fixture)


def test_prompt_cache_bytes_has_a_default_and_zero_turns_it_off(dirs):
    assert models(dirs, "sdxl")["m"].family.prompt_cache_bytes == 64 << 20
    assert models(dirs, "sdxl", prompt_cache_bytes=0)["m"].family.speed_spec()["prompt_cache_bytes"] == 0
    config_error(dirs, "sdxl", "prompt_cache_bytes", prompt_cache_bytes=-1)
    config_error(dirs, "sdxl", "prompt_cache_bytes", prompt_cache_bytes="1GB")


def test_caches_must_apply_to_the_family(dirs):
    assert models(dirs, "sdxl", caches=["deep"])["m"].family.caches == ("deep",)
    assert models(dirs, "wan", caches=["first_block", "taylorseer"])["m"].family.caches == ("first_block", "taylorseer")
    assert "does not apply" in config_error(dirs, "sdxl", "caches[0]", caches=["first_block"])
    assert "does not apply" in config_error(dirs, "flux-dev", "caches[1]", caches=["taylorseer", "deep"])
    config_error(dirs, "wan", "caches[0]", caches=["teacache"])


def test_default_cache_is_normalized_and_must_be_enabled(dirs):
    m = models(dirs, "sdxl", caches=["deep"], default_cache={"method": "deep"})["m"]
    assert m.family.default_cache == {"method": "deep", "interval": 3}
    assert req({"m": m}).cache == {"method": "deep", "interval": 3}  # a request that names none gets it
    assert "not enabled" in config_error(dirs, "sdxl", "default_cache.method", default_cache={"method": "deep"})
    config_error(dirs, "sdxl", "default_cache.interval", caches=["deep"], default_cache={"method": "deep", "interval": 1})


def test_a_request_cache_is_checked_and_part_of_the_batch_key(dirs):
    ms = models(dirs, "wan", caches=["first_block", "taylorseer"])
    a = req(ms, cache={"method": "first_block", "threshold": 0.1})
    b = req(ms, cache={"method": "first_block", "threshold": 0.2})
    c = req(ms, cache={"method": "first_block", "threshold": 0.1}, seed=9, prompt="a dog")
    plain = req(ms)
    assert a.cache == {"method": "first_block", "threshold": 0.1} and plain.cache is None
    assert a.key == c.key and len({a.key, b.key, plain.key}) == 3  # different settings: different batches
    assert a.key.execution == "first_block:threshold=0.1" and plain.key.execution == ""
    # a key with a cache runs at request level even on a step-batching model
    assert ModelLimits(step_batching=True).stepped(plain.key) and not ModelLimits(step_batching=True).stepped(a.key)
    assert "does not apply" in refused(ms, "cache.method", cache={"method": "deep"})
    assert "must be one of" in refused(ms, "cache.method", cache={"method": "teacache"})
    refused(ms, "cache.threshold", cache={"method": "first_block", "threshold": 0})
    refused(ms, "cache.threshold", cache={"method": "first_block", "threshold": "0.1"})
    refused(ms, "cache.interval", cache={"method": "first_block", "interval": 2})
    assert "not enabled" in refused(models(dirs, "wan"), "cache.method", cache={"method": "first_block"})
    # the job's params round-trip through the store with the cache
    assert type(a).from_dict(a.to_dict()).key == a.key


def test_compile_attention_backend_and_quantize(dirs):
    assert models(dirs, "sdxl")["m"].family.compile == "off"
    assert models(dirs, "sdxl", compile="regional")["m"].family.speed_spec()["compile"] == "regional"
    config_error(dirs, "sdxl", "compile", compile="max-autotune")
    assert models(dirs, "sdxl", attention_backend="native")["m"].family.attention_backend == "native"
    assert "unknown attention backend" in config_error(dirs, "sdxl", "attention_backend", attention_backend="fast")
    if not cuda_available():
        assert "flash-attn" in config_error(dirs, "sdxl", "attention_backend", attention_backend="flash")
        assert "CUDA" in config_error(dirs, "sdxl", "quantize", quantize="float8")
    config_error(dirs, "sdxl", "quantize", quantize="float3")


def test_flux_takes_the_hook_caches_and_sd3_none(dirs):
    ms = models(dirs, "flux-dev", caches=["first_block", "taylorseer"])
    assert req(ms, cache={"method": "first_block"}).cache == {"method": "first_block", "threshold": 0.1}
    assert req(ms, cache={"method": "taylorseer", "interval": 4}).key.execution == "taylorseer:interval=4"
    # SD3's transformer has no diffusers cache support in this diffusers: no step cache applies
    assert "it has: none" in config_error(dirs, "sd3", "caches[0]", caches=["first_block"])
