"""Wan 2.x text-to-video and image-to-video: a 3-D transformer over (1, 2, 2) patches of a causal
video VAE's latents (8× spatial, 4× temporal). Sizes: multiples of 16; num_frames - 1 a multiple
of 4. CFG when guidance > 1, the unconditional pass run *after* the conditional one (1 copy of
activations); None and "" negative prompts are the same input.

Image-to-video: the pipeline takes one conditioning image per call (its image embedding and the
encoded first frame are repeated over the batch), so jobs share a call only when they share the
image (its digest is part of the batch key). The image is fitted to the requested size by
``genserve.backends.image_input.fit_cover``: centre-cropped to its aspect ratio, then scaled to it."""
from __future__ import annotations

from .base import Configs, FamilyAdapter, Traits
from .memory import dit_bytes, output_bytes, wan_vae_bytes

CLASSES = ("WanPipeline", "WanImageToVideoPipeline")
PACKAGES = ("ftfy",)  # prompt cleaning (a declared dependency); checked at load


def traits(pipeline: str, configs: Configs) -> Traits:
    vae, t = configs.get("vae") or {}, configs.get("transformer") or {}
    patch = t.get("patch_size") or (1, 2, 2)
    spatial = int(vae.get("scale_factor_spatial") or 8) * int(patch[1])
    temporal = int(vae.get("scale_factor_temporal") or 4)
    i2v = pipeline == "WanImageToVideoPipeline"
    return Traits("wan-i2v" if i2v else "wan", pipeline, "video", spatial, frame_multiple=temporal,
                  max_sequence_length=512, image_input=i2v)


class Adapter(FamilyAdapter):
    family = "wan"

    @property
    def inputs_supplied(self):  # type: ignore[override]
        return frozenset({"prompt", "image"} if self.traits.image_input else {"prompt"})

    def text_path(self):
        from ..prompt_cache import T5Text

        return T5Text(self.options.max_sequence_length or 512)  # the pipeline's __call__ default

    def step_driver(self, pipe):
        from ..stepping import WanFamily

        # text-to-video with one transformer (Wan 2.1 style); I2V conditioning and Wan 2.2's two
        # transformers / expanded timesteps are not step-batched yet
        two_stage = getattr(pipe, "transformer_2", None) is not None or getattr(pipe.config, "expand_timesteps", False)
        if self.traits.image_input or two_stage:
            return None
        return WanFamily(self.options.max_sequence_length or 512)

    def call_kwargs(self, jobs, params):
        kw = super().call_kwargs(jobs, params)
        if self.traits.image_input:
            from ..image_input import fit_cover

            kw["image"] = fit_cover(jobs[0]["image_pil"].convert("RGB"), params["width"], params["height"])
        return kw

    def working_phases(self, n: int, width: int, height: int, frames: int, guidance: float,
                       dtype_bytes: int) -> dict[str, int]:
        t, vae = self.configs.get("transformer") or {}, self.configs.get("vae") or {}
        patch = t.get("patch_size") or (1, 2, 2)
        scale = int(vae.get("scale_factor_spatial") or 8)
        latent_frames = (max(1, frames) - 1) // self.traits.frame_multiple + 1
        pt, ph, pw = (int(x) for x in patch)
        tokens = (latent_frames // pt) * (height // (scale * ph)) * (width // (scale * pw))
        hidden = int(t.get("num_attention_heads", 40)) * int(t.get("attention_head_dim", 128))
        act = dit_bytes(tokens, hidden, int(t.get("ffn_dim") or 4 * hidden), n, 1, dtype_bytes)
        decode = wan_vae_bytes(vae, width, height, frames, n, dtype_bytes)
        # Image-to-video also *encodes* the conditioning video (same causal chunking): no larger.
        return {"denoiser": act, "vae": decode, "output": output_bytes(n, width, height, frames)}
