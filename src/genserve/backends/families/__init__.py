"""Model families: which pipeline class is which family, what each honours, how it is driven.

``traits_for`` / ``inspect_model_dir`` are pure (config files only) and used by the server to
validate configs and requests; ``adapter_for`` is used by the worker on a loaded pipeline. One
module per family (sd, sdxl, flux, sd3, wan) and a generic fallback from the call signature.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import flux, generic, sd, sd3, sdxl, wan
from .base import MAX_SEQUENCE_LENGTH, Configs, FamilyAdapter, Options, Traits, UnsupportedPipeline, call_variant

__all__ = ["MAX_SEQUENCE_LENGTH", "DEMO_TRAITS", "FamilyAdapter", "Options", "Traits", "UnsupportedPipeline",
           "adapter_for", "call_variant", "inspect_model_dir", "traits_for"]

FAMILIES = {cls: mod for mod in (sd, sdxl, flux, sd3, wan) for cls in mod.CLASSES}


def traits_for(pipeline: str, configs: Configs) -> Traits | None:
    """A known family's traits from the pipeline class name and component configs (None: unknown)."""
    mod = FAMILIES.get(pipeline)
    return mod.traits(pipeline, configs) if mod else None


def read_configs(path: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(pipeline class, configs) of a diffusers model directory, or None if it has no model_index.json."""
    path = Path(path)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    configs: dict[str, Any] = {"_pipeline": index}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        for fname in ("config.json", "scheduler_config.json"):
            try:
                configs[name] = json.loads((path / name / fname).read_text())
                break
            except (OSError, ValueError):
                continue
    return str(index.get("_class_name", "")), configs


def inspect_model_dir(path: str | Path) -> Traits | None:
    got = read_configs(path)
    return traits_for(*got) if got else None


# The demo catalog's models (built at first start, so their files are not there when the config
# is read): the same configs as backends/demo.py builds.
DEMO_TRAITS = {
    "demo:image": sd.traits("StableDiffusionPipeline", {"vae": {"block_out_channels": [16, 32]}}),
    "demo:video": wan.traits("WanPipeline", {"vae": {}, "transformer": {"patch_size": [1, 2, 2]}}),
    "demo:i2v": wan.traits("WanImageToVideoPipeline", {"vae": {}, "transformer": {"patch_size": [1, 2, 2]}}),
}


def pipe_configs(pipe: Any) -> dict[str, Any]:
    configs: dict[str, Any] = {"_pipeline": dict(getattr(pipe, "config", {}) or {})}
    for name, comp in pipe.components.items():
        cfg = getattr(comp, "config", None)
        if cfg is not None:
            try:
                configs[name] = dict(cfg)
            except (TypeError, ValueError):
                continue
    return configs


def missing_packages(names) -> list[str]:
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is None]


def adapter_for(pipe: Any, spec: dict[str, Any]) -> FamilyAdapter:
    """The adapter for a loaded pipeline; raises UnsupportedPipeline if genserve cannot serve it
    as configured (kind mismatch, required inputs it cannot supply, knobs the family lacks)."""
    name = type(pipe).__name__
    configs = pipe_configs(pipe)
    options = Options.from_spec(spec)
    mod = FAMILIES.get(name)
    kind = spec.get("kind", "image")
    if mod is not None:
        missing_pkgs = missing_packages(getattr(mod, "PACKAGES", ()))
        if missing_pkgs:  # diffusers imports them lazily: without this, every job fails with a NameError
            raise UnsupportedPipeline(f"{name} needs the Python package(s) {', '.join(missing_pkgs)} at run time; "
                                      "install them in the worker's environment")
        traits = mod.traits(name, configs)
        adapter: FamilyAdapter = mod.Adapter(traits, configs, options)
    else:
        traits = generic.traits_from_signature(pipe, kind)
        adapter = generic.Adapter(traits, configs, options).bind(pipe)
    if traits.kind != kind:
        raise UnsupportedPipeline(f"{name} makes {traits.kind}s but the model is configured with kind = {kind!r}")
    missing = sorted(generic.required_inputs(pipe) - adapter.inputs_supplied)
    if missing:
        raise UnsupportedPipeline(f"{name} requires inputs genserve cannot supply: {', '.join(missing)}")
    if options.true_cfg_scale is not None and not traits.true_cfg:
        raise UnsupportedPipeline(f"{name} ({traits.family}) does not take true_cfg_scale")
    if options.max_sequence_length is not None and not traits.max_sequence_length:
        raise UnsupportedPipeline(f"{name} ({traits.family}) does not take max_sequence_length")
    check_shape_keys(traits, spec)
    return adapter


def check_shape_keys(traits: Traits, spec: dict[str, Any]) -> None:
    """The config's ``size_multiple`` / ``frame_stride`` (in the load spec) against what the loaded
    pipeline can produce. The server checks them when it can read the model's files at start-up;
    a source it could not read then (``s3://``, a Hugging Face id, a directory that appeared later)
    is checked here, so a size the family would round (FLUX) or refuse (SD3) is a load failure
    naming the key, not a job that fails or comes back at another size."""
    fam = f"{traits.pipeline} ({traits.family})"
    sm = spec.get("size_multiple")
    if sm and sm % traits.size_multiple:
        raise UnsupportedPipeline(f"size_multiple = {sm}: {fam} needs sizes that are multiples of "
                                  f"{traits.size_multiple}; set size_multiple to a multiple of it")
    fs = spec.get("frame_stride")
    if traits.kind == "video" and traits.frame_multiple and fs and fs % traits.frame_multiple:
        raise UnsupportedPipeline(f"frame_stride = {fs}: {fam} needs num_frames - 1 to be a multiple of "
                                  f"{traits.frame_multiple}; set frame_stride to a multiple of it")
