"""Stable Diffusion 1.x / 2.x: UNet + AutoencoderKL + one CLIP text encoder. Classifier-free
guidance when guidance > 1 (the negative prompt is used only then; None and "" are the same
unconditional input). Sizes: multiples of the VAE scale factor (8)."""
from __future__ import annotations

from .base import Configs, FamilyAdapter, Traits, kl_scale
from .memory import kl_decode_bytes, output_bytes, unet_bytes

CLASSES = ("StableDiffusionPipeline",)


def traits(pipeline: str, configs: Configs) -> Traits:
    return Traits("sd", pipeline, "image", kl_scale(configs.get("vae")))


class Adapter(FamilyAdapter):
    family = "sd"

    def step_driver(self, pipe):
        from ..stepping import UNetFamily

        # LCM-style UNets embed guidance as an input: not step-batched yet
        return UNetFamily() if getattr(pipe.unet.config, "time_cond_proj_dim", None) is None else None

    def vae_dtype_bytes(self, dtype_bytes: int) -> int:
        return dtype_bytes

    def working_phases(self, n: int, width: int, height: int, frames: int, guidance: float,
                       dtype_bytes: int) -> dict[str, int]:
        scale = self.traits.size_multiple
        copies = 2 if guidance > 1.0 else 1  # the pipeline batches [uncond, cond]
        act = unet_bytes(self.configs.get("unet") or {}, width // scale, height // scale, n, copies, dtype_bytes)
        vae = kl_decode_bytes(self.configs.get("vae") or {}, width, height, n, self.vae_dtype_bytes(dtype_bytes))
        return {"denoiser": act, "vae": vae, "output": output_bytes(n, width, height, 0)}
