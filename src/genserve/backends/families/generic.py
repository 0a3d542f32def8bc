"""The fallback for pipelines no family module knows, built from ``inspect.signature`` of the
pipeline's ``__call__``: it passes only the parameters the signature takes, takes the size
multiple from the pipeline's VAE scale factor × its transformer's patch size (packing such as
FLUX's is invisible here: the runner's output check catches what it rounds), and (knowing nothing of how the pipeline treats a
missing negative prompt) keeps jobs with and without one in separate calls."""
from __future__ import annotations

import inspect
from typing import Any

from .base import FamilyAdapter, Traits

SKIP = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}


def call_parameters(pipe: Any) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(type(pipe).__call__)
    return {n: p for n, p in sig.parameters.items() if n != "self" and p.kind not in SKIP}


def required_inputs(pipe: Any) -> set[str]:
    return {n for n, p in call_parameters(pipe).items() if p.default is inspect.Parameter.empty}


def patch_size(pipe: Any) -> int:
    """The spatial patch size of the pipeline's transformer (1: none, or a UNet)."""
    p = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
    if isinstance(p, (list, tuple)) and p:
        p = p[-1]  # (t, h, w) for video transformers
    return p if isinstance(p, int) and p > 0 else 1


def traits_from_signature(pipe: Any, kind: str) -> Traits:
    params = call_parameters(pipe)
    vae = int(getattr(pipe, "vae_scale_factor", 0) or getattr(pipe, "vae_scale_factor_spatial", 0) or 8)
    scale = vae * patch_size(pipe)  # a transformer over p×p latent patches needs sizes of vae × p
    msl = params.get("max_sequence_length")
    return Traits(
        "generic", type(pipe).__name__, kind, scale,
        frame_multiple=int(getattr(pipe, "vae_scale_factor_temporal", 0) or 1) if kind == "video" else 0,
        negative="cfg" if "negative_prompt" in params else "none",
        guidance="cfg" if "guidance_scale" in params else "none",
        true_cfg="true_cfg_scale" in params,
        max_sequence_length=int(msl.default) if msl is not None and isinstance(msl.default, int) else 0,
        image_input="image" in required_inputs(pipe),
        negative_in_key=True,
    )


class Adapter(FamilyAdapter):
    family = "generic"
    checks_inputs = True

    def bind(self, pipe: Any) -> "Adapter":
        self.params = set(call_parameters(pipe))
        return self

    @property
    def inputs_supplied(self):  # type: ignore[override]
        return frozenset({"prompt", "image"} if self.traits.image_input else {"prompt"})

    def call_kwargs(self, jobs, params):
        kw = super().call_kwargs(jobs, params)
        if self.traits.image_input:
            from ..image_input import fit_cover

            kw["image"] = fit_cover(jobs[0]["image_pil"].convert("RGB"), params["width"], params["height"])
        return {k: v for k, v in kw.items() if k in self.params}
