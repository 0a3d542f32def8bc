"""SDXL (and Turbo-style SDXL: same classes, guidance 0 and few steps). Like SD, plus two text
encoders. With ``force_zeros_for_empty_prompt`` (the default) a job *without* a negative prompt
gets an all-zero unconditional embedding while one with a negative prompt (even "") gets its
encoding, so the two never share a pipeline call: the presence of a negative prompt is part of
the batch key. The VAE is decoded in float32 when its config says ``force_upcast``."""
from __future__ import annotations

from .base import Configs, Traits, kl_scale
from .sd import Adapter as SDAdapter

CLASSES = ("StableDiffusionXLPipeline",)


def traits(pipeline: str, configs: Configs) -> Traits:
    zeros = bool((configs.get("_pipeline") or {}).get("force_zeros_for_empty_prompt", True))
    return Traits("sdxl", pipeline, "image", kl_scale(configs.get("vae")), negative_in_key=zeros)


class Adapter(SDAdapter):
    family = "sdxl"

    def text_path(self):
        return None  # two text encoders and pooled embeddings: the pipeline encodes its prompts

    def step_driver(self, pipe):
        return None  # its UNet also takes pooled text embeddings and size/crop ids: not step-batched yet

    def vae_dtype_bytes(self, dtype_bytes: int) -> int:
        return 4 if (self.configs.get("vae") or {}).get("force_upcast") else dtype_bytes
