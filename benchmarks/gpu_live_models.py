"""Random-weight checkpoints for benchmarks/gpu_live.py: the *published* configurations of SDXL base
1.0, Wan 2.1 T2V 1.3B and FLUX.1-schnell (every component at its real size: nothing can be
downloaded, so the config dicts are written out here), and the tiny family configurations of
tests/family_models.py for the CPU dry run. One builder per family takes either set, so the dry run
goes through the same code as the device run.

Weights are built directly on the target device in the target dtype (a 12B-parameter transformer
built on a CPU in float32 would take minutes and 48 GB), then saved with ``save_pretrained`` and
served from disk like a downloaded checkpoint. Tokenizers: the demo's byte-level CLIP tokenizer
(514 tokens, standing in for CLIP / T5 / UMT5 tokenizers: the pipelines only call them); the
embedding tables keep their published vocabulary sizes, so the weights' bytes are the real ones.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from genserve.backends.demo import _write_tokenizer, vocab_size

V = vocab_size()
TOKEN_IDS = {"bos_token_id": V - 2, "eos_token_id": V - 1, "pad_token_id": V - 1}

# ---- published configurations (the Hugging Face repos' config.json files) --------------------------

SDXL_PUBLISHED = {  # stabilityai/stable-diffusion-xl-base-1.0
    "unet": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu"),
    # CLIP ViT-L/14 text tower, and OpenCLIP ViT-bigG/14's (with its projection)
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                         num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "text_encoder_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                           num_hidden_layers=32, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),
    "vae": dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "scheduler": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      num_train_timesteps=1000, prediction_type="epsilon", timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False),
}

WAN_PUBLISHED = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                        rope_max_seq_len=1024),
    "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                temperal_downsample=[False, True, True]),
    # google/umt5-xxl's encoder
    "text_encoder": dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                         relative_attention_num_buckets=32, relative_attention_max_distance=128,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "scheduler": dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000,
                      solver_order=2, solver_type="bh2", final_sigmas_type="zero", timestep_spacing="linspace"),
}

FLUX_SCHNELL_PUBLISHED = {  # black-forest-labs/FLUX.1-schnell
    "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    "text_encoder": SDXL_PUBLISHED["text_encoder"],  # CLIP ViT-L/14
    "text_encoder_2": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                           relative_attention_num_buckets=32, relative_attention_max_distance=128,
                           feed_forward_proj="gated-gelu", tie_word_embeddings=False),  # google/t5-v1_1-xxl
    "vae": dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=16,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "scheduler": dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15, num_train_timesteps=1000),
}

# ---- tiny configurations (tests/family_models.py's, for the CPU dry run) ---------------------------

_TINY_CLIP = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=77, projection_dim=32)
_TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, norm_num_groups=4, layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
_TINY_T5 = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)

SDXL_TINY = {
    "unet": dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
                 cross_attention_dim=64, norm_num_groups=8),
    "text_encoder": _TINY_CLIP, "text_encoder_2": _TINY_CLIP,
    "vae": dict(_TINY_VAE, latent_channels=4, force_upcast=True),
    "scheduler": SDXL_PUBLISHED["scheduler"],
}
WAN_TINY = {
    "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    "vae": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
    "text_encoder": _TINY_T5,
    "scheduler": WAN_PUBLISHED["scheduler"],
}
FLUX_TINY = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
                        axes_dims_rope=(4, 6, 6)),
    "text_encoder": _TINY_CLIP, "text_encoder_2": _TINY_T5,
    "vae": dict(_TINY_VAE, latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                use_post_quant_conv=False),
    "scheduler": FLUX_SCHNELL_PUBLISHED["scheduler"],
}

CONFIGS = {"published": {"sdxl": SDXL_PUBLISHED, "wan": WAN_PUBLISHED, "flux": FLUX_SCHNELL_PUBLISHED},
           "tiny": {"sdxl": SDXL_TINY, "wan": WAN_TINY, "flux": FLUX_TINY}}


@contextlib.contextmanager
def on_device(device: str, dtype: Any):
    """Modules built inside are allocated on ``device`` in ``dtype`` (no CPU copy, no float32 pass)."""
    import torch

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(prev)


def _tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def _clip(cls, cfg: dict[str, Any]):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(**cfg, **TOKEN_IDS))


def _t5(cls, config_cls, cfg: dict[str, Any]):
    return cls(config_cls(**cfg, pad_token_id=V - 1, eos_token_id=V - 1))


# Each builder makes the schedulers and tokenizers on the CPU (they hold small tensors the pipelines
# expect there) and the torch modules inside ``dev()`` (on the device, in the dtype).

def _sdxl(cfg: dict[str, Any], dev):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok, sched = _tokenizer(), EulerDiscreteScheduler(**cfg["scheduler"])
    with dev():
        vae, unet = AutoencoderKL(**cfg["vae"]), UNet2DConditionModel(**cfg["unet"])
        te, te2 = _clip(CLIPTextModel, cfg["text_encoder"]), _clip(CLIPTextModelWithProjection, cfg["text_encoder_2"])
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)


def _wan(cfg: dict[str, Any], dev):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok, sched = _tokenizer(), UniPCMultistepScheduler(**cfg["scheduler"])
    with dev():
        te = _t5(UMT5EncoderModel, UMT5Config, cfg["text_encoder"])
        vae, transformer = AutoencoderKLWan(**cfg["vae"]), WanTransformer3DModel(**cfg["transformer"])
    return WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, transformer=transformer)


def _flux(cfg: dict[str, Any], dev):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tok, sched = _tokenizer(), FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    with dev():
        vae, transformer = AutoencoderKL(**cfg["vae"]), FluxTransformer2DModel(**cfg["transformer"])
        te, te2 = _clip(CLIPTextModel, cfg["text_encoder"]), _t5(T5EncoderModel, T5Config, cfg["text_encoder_2"])
    return FluxPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                        transformer=transformer)


BUILDERS = {"sdxl": _sdxl, "wan": _wan, "flux": _flux}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def build(name: str, out: Path, scale: str, device: str, dtype: str) -> dict[str, Any]:
    """Build ``name`` ("sdxl", "wan", "flux") at ``scale`` ("published" or "tiny") on ``device`` in
    ``dtype`` and save it to ``out``. Returns what the report says about it. An existing checkpoint
    (``model_index.json`` present) is reused: ``--work`` keeps them between runs."""
    import torch

    out = Path(out)
    if (out / "model_index.json").exists():
        return {"seconds": 0.0, "params": None, "disk_bytes": dir_bytes(out), "reused": True}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    pipe = BUILDERS[name](CONFIGS[scale][name], lambda: on_device(device, getattr(torch, dtype)))
    params = sum(p.numel() for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters())
    t_built = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)  # then renamed: an interrupted save never looks like a checkpoint
    tmp.rename(out)
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"seconds": time.perf_counter() - t0, "build_s": t_built - t0, "params": params,
            "disk_bytes": dir_bytes(out), "reused": False}
