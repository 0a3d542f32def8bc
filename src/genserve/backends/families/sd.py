"""Stable Diffusion 1.x / 2.x: UNet + AutoencoderKL + one CLIP text encoder. Classifier-free
guidance when guidance > 1 (the negative prompt is used only then; None and "" are the same
unconditional input). Sizes: multiples of the VAE scale factor (8).

Image-to-image and inpainting run ``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline``
built over the loaded pipeline's components (``from_pipe``: no second copy of the weights). Each
job brings its own init image (and mask), fitted to the requested size by ``fit_cover``; a call
shares one strength (the batch key holds it). A 4-channel UNet inpaints by blending: outside the
mask, each step's latents are replaced by the init image's, re-noised to that step."""
from __future__ import annotations

from .base import Configs, FamilyAdapter, Traits, kl_scale
from .memory import kl_decode_bytes, output_bytes, unet_bytes

CLASSES = ("StableDiffusionPipeline",)


def traits(pipeline: str, configs: Configs) -> Traits:
    return Traits("sd", pipeline, "image", kl_scale(configs.get("vae")), edit=True)


TASK_PIPELINES = {"img2img": "StableDiffusionImg2ImgPipeline", "inpaint": "StableDiffusionInpaintPipeline"}


class Adapter(FamilyAdapter):
    family = "sd"

    def pipeline(self, pipe, task: str):
        if task not in TASK_PIPELINES:
            return pipe
        cache = self.__dict__.setdefault("_task_pipes", {})
        if task not in cache or cache[task][0] is not pipe:
            import diffusers

            built = getattr(diffusers, TASK_PIPELINES[task]).from_pipe(pipe)
            built.set_progress_bar_config(disable=True)
            cache[task] = (pipe, built)
        return cache[task][1]

    def call_kwargs(self, jobs, params):
        kw = super().call_kwargs(jobs, params)
        task = jobs[0].get("task") or "text"
        if task in TASK_PIPELINES:
            from ..image_input import fit_cover

            w, h = params["width"], params["height"]
            kw["image"] = [fit_cover(j["image_pil"].convert("RGB"), w, h) for j in jobs]
            kw["strength"] = float(jobs[0]["strength"])
            if task == "inpaint":
                kw["mask_image"] = [fit_cover(j["mask_pil"].convert("L"), w, h) for j in jobs]
            else:  # the img2img pipeline takes its size from the (fitted) image
                kw.pop("width"), kw.pop("height")
        return kw

    def text_path(self):
        from ..prompt_cache import ClipText

        return ClipText()

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
