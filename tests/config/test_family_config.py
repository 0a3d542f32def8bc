"""Model configs and requests checked against the model's family, read from the model directory's
JSON files (model_index.json + component config.json: what the server reads; no weights)."""
import json

import pytest

from genserve.backends.image_input import data_url
from genserve.config.load import ConfigError, load_config, parse_config
from genserve.server.requests import RequestError, validate

KL4 = {"block_out_channels": [128, 256, 512, 512]}
LAYOUTS = {
    "sdxl": ("StableDiffusionXLPipeline", {"force_zeros_for_empty_prompt": True},
             {"unet": {"block_out_channels": [320, 640, 1280]}, "vae": KL4}),
    "flux-dev": ("FluxPipeline", {}, {"transformer": {"guidance_embeds": True, "num_attention_heads": 24,
                                                      "attention_head_dim": 128}, "vae": KL4}),
    "flux-schnell": ("FluxPipeline", {}, {"transformer": {"guidance_embeds": False}, "vae": KL4}),
    "sd3": ("StableDiffusion3Pipeline", {}, {"transformer": {"patch_size": 2, "pos_embed_max_size": 96}, "vae": KL4}),
    "wan": ("WanPipeline", {}, {"transformer": {"patch_size": [1, 2, 2]}, "vae": {"scale_factor_spatial": 8}}),
    "wan-i2v": ("WanImageToVideoPipeline", {}, {"transformer": {"patch_size": [1, 2, 2]},
                                                 "vae": {"scale_factor_spatial": 8}}),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, (cls, extra, comps) in LAYOUTS.items():
        d = root / name
        d.mkdir()
        index = {"_class_name": cls, "_diffusers_version": "0.42.0", **extra}
        for comp, cfg in comps.items():
            index[comp] = ["diffusers", "X"]
            (d / comp).mkdir()
            (d / comp / "config.json").write_text(json.dumps(cfg))
        (d / "model_index.json").write_text(json.dumps(index))
        out[name] = d
    return out


def models(dirs, name, **keys):
    kind = "video" if name.startswith("wan") else "image"
    table = {"kind": kind, "source": str(dirs[name]), "default_size": "512x512" if kind == "image" else "64x64",
             **({"default_frames": 9, "max_frames": 33} if kind == "video" else {}), **keys}
    return parse_config({"models": {"m": table}}).models


def req(ms, **body):
    return validate({"model": "m", "prompt": "a cat", **body}, ms, random_seed=1)


def refused(ms, field, **body):
    with pytest.raises(RequestError) as e:
        req(ms, **body)
    assert e.value.field == field and e.value.status == 400, e.value
    return e.value.message


def config_error(dirs, name, key, **keys):
    with pytest.raises(ConfigError) as e:
        models(dirs, name, **keys)
    assert e.value.key == f"models.m.{key}", e.value
    return str(e.value)


def test_size_multiple_is_taken_from_the_model_or_checked_against_it(dirs):
    assert models(dirs, "flux-dev")["m"].size_multiple == 16  # VAE 8 × 2×2 packing
    assert models(dirs, "sd3")["m"].size_multiple == 16  # VAE 8 × patch 2
    assert models(dirs, "sdxl")["m"].size_multiple == 8
    assert models(dirs, "wan")["m"].size_multiple == 16 and models(dirs, "wan")["m"].frame_stride == 4
    assert models(dirs, "flux-dev", size_multiple=32)["m"].size_multiple == 32  # a multiple of 16: fine
    assert "multiples of 16" in config_error(dirs, "flux-dev", "size_multiple", size_multiple=8)
    config_error(dirs, "flux-dev", "sizes[1]", sizes=["1024x1024", "72x64"])
    config_error(dirs, "wan", "frame_stride", frame_stride=2)
    config_error(dirs, "sd3", "sizes[0]", sizes=["2048x1024"])  # beyond the positional embedding (1536)
    config_error(dirs, "wan", "kind", kind="image", default_frames=0, max_frames=0)


def test_family_keys_are_validated(dirs):
    assert models(dirs, "flux-dev", true_cfg_scale=4.0, max_sequence_length=256)["m"].family.true_cfg_scale == 4.0
    config_error(dirs, "sdxl", "true_cfg_scale", true_cfg_scale=4.0)
    config_error(dirs, "sdxl", "max_sequence_length", max_sequence_length=77)
    config_error(dirs, "flux-dev", "max_sequence_length", max_sequence_length=1000)
    config_error(dirs, "flux-dev", "true_cfg_scale", true_cfg_scale="high")
    public = models(dirs, "flux-dev")["m"].public()
    assert public["family"]["family"] == "flux" and public["family"]["guidance"] == "embedded"


def test_unsupported_sizes_are_refused_at_submit(dirs):
    for name in ("flux-dev", "flux-schnell", "sd3", "wan", "wan-i2v"):
        ms = models(dirs, name)
        assert "multiple of 16" in refused(ms, "width", width=72, height=64)
    assert "positional embedding" in refused(models(dirs, "sd3"), "width", width=1552, height=16)
    refused(models(dirs, "sdxl"), "height", width=512, height=516)
    refused(models(dirs, "wan"), "num_frames", num_frames=6)


def test_negative_prompts_are_refused_where_they_would_be_ignored(dirs):
    assert "true_cfg_scale" in refused(models(dirs, "flux-dev"), "negative_prompt", negative_prompt="blurry")
    ok = req(models(dirs, "flux-dev", true_cfg_scale=4.0), negative_prompt="blurry")
    assert ok.negative_prompt == "blurry"
    turbo = models(dirs, "sdxl", default_guidance=0.0, default_steps=1)  # SDXL-Turbo style
    assert "guidance > 1" in refused(turbo, "negative_prompt", negative_prompt="blurry")
    assert req(turbo, negative_prompt="blurry", guidance=5.0).negative_prompt == "blurry"
    refused(models(dirs, "sd3"), "negative_prompt", negative_prompt="x", guidance=1.0)
    refused(models(dirs, "wan"), "negative_prompt", negative_prompt="x", guidance=1.0)


def test_guidance_is_refused_where_the_model_has_none(dirs):
    assert "no guidance input" in refused(models(dirs, "flux-schnell"), "guidance", guidance=3.5)
    assert req(models(dirs, "flux-dev"), guidance=1.0).guidance == 1.0  # embedded: any value is honoured


def test_batch_keys_keep_apart_what_would_change_each_others_output(dirs):
    sdxl = models(dirs, "sdxl", default_guidance=5.0)
    none, empty, text = req(sdxl), req(sdxl, negative_prompt=""), req(sdxl, negative_prompt="blurry")
    assert none.key != empty.key and empty.key == text.key  # force_zeros: None ≠ ""
    sd3 = models(dirs, "sd3", default_guidance=5.0)
    assert req(sd3).key == req(sd3, negative_prompt="blurry").key  # None ≡ "": one call is fine
    assert req(sd3, guidance=4.0).key != req(sd3, guidance=5.0).key  # guidance is always in the key
    flux_cfg = models(dirs, "flux-dev", true_cfg_scale=4.0)
    assert req(flux_cfg).key != req(flux_cfg, negative_prompt="x").key  # true CFG is switched per call


def test_image_to_video_needs_a_valid_image_and_batches_per_image(dirs):
    from PIL import Image

    i2v = models(dirs, "wan-i2v")
    assert "required" in refused(i2v, "image")
    refused(i2v, "image", image="https://example.com/cat.png")
    refused(i2v, "image", image="data:image/png;base64,not-base64!")
    refused(i2v, "image", image=data_url(Image.new("RGB", (32, 32)), "JPEG").replace("image/jpeg", "image/png"))
    refused(i2v, "image", image=data_url(Image.new("RGB", (4, 32))))  # too small to be a frame
    red, blue = (data_url(Image.new("RGB", (64, 48), c)) for c in ("red", "blue"))
    a, b, c = req(i2v, image=red), req(i2v, image=red), req(i2v, image=blue, negative_prompt="x")
    # the image is stored by the server at submit (job_inputs.py); the params carry its digest
    assert a.key == b.key != c.key and a.task == "i2v" and a.image_sha256 == b.image_sha256 != c.image_sha256
    assert "does not take" in refused(models(dirs, "wan"), "image", image=red)
    assert "does not take" in refused(models(dirs, "sdxl"), "image", image=red)


def test_demo_catalog_and_unreadable_sources_are_unchanged(tmp_path):
    demo = load_config(None).models
    assert demo["demo-image"].size_multiple == 8 and demo["demo-image"].family.traits.family == "sd"
    assert demo["demo-video"].family.traits.family == "wan" and demo["demo-video"].frame_stride == 4
    ms = parse_config({"models": {"m": {"kind": "image", "source": str(tmp_path / "not-there-yet")}}}).models
    assert ms["m"].family.traits is None and ms["m"].size_multiple == 8  # checked when a worker loads it
    assert req(ms, negative_prompt="x", guidance=1.0).key.variant == "neg"  # unknown: kept apart


def test_the_load_message_carries_what_the_worker_checks(tmp_path):
    """A source the server cannot read at start-up is checked by the worker at load: the load spec
    carries the size_multiple / frame_stride requests are validated against."""
    from genserve.engine import LoadModel
    from genserve.server.runtime.messages import load_message

    cfg = parse_config({"models": {
        "img": {"kind": "image", "source": "s3://bucket/flux"},
        "vid": {"kind": "video", "source": str(tmp_path / "later"), "frame_stride": 4, "size_multiple": 16,
                "default_size": "64x64", "default_frames": 9, "max_frames": 33}}})
    img = load_message(cfg, LoadModel("w0", "img"))["spec"]
    vid = load_message(cfg, LoadModel("w0", "vid"))["spec"]
    assert (img["size_multiple"], img["frame_stride"]) == (8, None)
    assert (vid["size_multiple"], vid["frame_stride"]) == (16, 4)
