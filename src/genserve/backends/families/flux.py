"""FLUX.1 (dev and schnell style): a packed-latent transformer with joint text + image attention.
Latents are packed in 2×2 patches, so sizes are multiples of 2 × the VAE scale (16).

- dev style (``guidance_embeds``): guidance is an *input* of the transformer, honoured at any
  value, one pass per step (no CFG copies).
- schnell style: guidance is ignored (a request that sets it is refused).
- Negative prompts need true CFG: the model's ``true_cfg_scale`` > 1 (a second, sequential pass
  per step). Diffusers switches true CFG on for the *whole call* when any job has a negative
  prompt, so its presence is part of the batch key.
- ``max_sequence_length``: T5 tokens (dev 512, schnell 256 by convention), at most 512."""
from __future__ import annotations

from .base import Configs, FamilyAdapter, Traits, kl_scale
from .memory import dit_bytes, kl_decode_bytes, output_bytes

CLASSES = ("FluxPipeline",)


def traits(pipeline: str, configs: Configs) -> Traits:
    embeds = bool((configs.get("transformer") or {}).get("guidance_embeds", False))
    return Traits("flux", pipeline, "image", 2 * kl_scale(configs.get("vae")), negative="true_cfg",
                  guidance="embedded" if embeds else "none", true_cfg=True, max_sequence_length=512,
                  negative_in_key=True)


class Adapter(FamilyAdapter):
    family = "flux"

    def working_phases(self, n: int, width: int, height: int, frames: int, guidance: float,
                       dtype_bytes: int) -> dict[str, int]:
        t = self.configs.get("transformer") or {}
        hidden = int(t.get("num_attention_heads", 24)) * int(t.get("attention_head_dim", 128))
        tokens = (width // self.traits.size_multiple) * (height // self.traits.size_multiple)
        tokens += self.options.max_sequence_length or self.traits.max_sequence_length
        act = dit_bytes(tokens, hidden, 4 * hidden, n, 1, dtype_bytes)  # true CFG runs sequentially
        vae = kl_decode_bytes(self.configs.get("vae") or {}, width, height, n, dtype_bytes)
        return {"denoiser": act, "vae": vae, "output": output_bytes(n, width, height, 0)}
