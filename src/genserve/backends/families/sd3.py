"""Stable Diffusion 3 / 3.5: an MMDiT over 2×2 latent patches with joint text + image attention
(CLIP-L + CLIP-G + T5). Sizes: multiples of VAE scale × patch size (16), and at most what the
positional embedding covers (``pos_embed_max_size`` × patch × VAE scale). CFG when guidance > 1,
batched with the conditional pass (2 copies); None and "" negative prompts are the same input."""
from __future__ import annotations

from .base import Configs, FamilyAdapter, Traits, kl_scale
from .memory import dit_bytes, kl_decode_bytes, output_bytes

CLASSES = ("StableDiffusion3Pipeline",)
CLIP_TOKENS = 77


def traits(pipeline: str, configs: Configs) -> Traits:
    t = configs.get("transformer") or {}
    scale, patch = kl_scale(configs.get("vae")), int(t.get("patch_size") or 2)
    max_side = int(t.get("pos_embed_max_size") or 0) * patch * scale
    return Traits("sd3", pipeline, "image", scale * patch, max_side=max_side, max_sequence_length=256)


class Adapter(FamilyAdapter):
    family = "sd3"

    def working_phases(self, n: int, width: int, height: int, frames: int, guidance: float,
                       dtype_bytes: int) -> dict[str, int]:
        t = self.configs.get("transformer") or {}
        hidden = int(t.get("num_attention_heads", 24)) * int(t.get("attention_head_dim", 64))
        m = self.traits.size_multiple
        tokens = (width // m) * (height // m) + CLIP_TOKENS
        tokens += self.options.max_sequence_length or self.traits.max_sequence_length
        copies = 2 if guidance > 1.0 else 1
        act = dit_bytes(tokens, hidden, 4 * hidden, n, copies, dtype_bytes)
        vae = kl_decode_bytes(self.configs.get("vae") or {}, width, height, n, dtype_bytes)
        return {"denoiser": act, "vae": vae, "output": output_bytes(n, width, height, 0)}
