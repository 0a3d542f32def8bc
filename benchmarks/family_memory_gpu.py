"""Peak working memory of the published SDXL, FLUX.1-dev, SD3-medium and Wan 2.1 14B components on
a CUDA device, to check the family estimates (backends/families/memory.py) against.

Each component is built with random weights at its published configuration directly on the device
(no download), then runs one forward pass / VAE decode under inference_mode at the shape the
estimate tests use (1024², Wan 832×480×81); the figure is the allocator's peak minus what was
allocated before the call (the weights). The results are recorded in
tests/backends/test_family_memory.py (MEASURED_GIB). Needs ~35 GiB of device memory and diffusers.

    python benchmarks/family_memory_gpu.py [OUT.json]
"""
from __future__ import annotations

import json
import sys
import time

import torch
from diffusers import (AutoencoderKL, AutoencoderKLWan, FluxTransformer2DModel, SD3Transformer2DModel,
                       UNet2DConditionModel, WanTransformer3DModel)

DEV = "cuda"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
GiB = 1 << 30
RESULTS: dict[str, dict[str, float]] = {}


def build(cls, dtype, **config):
    torch.set_default_dtype(dtype)
    with torch.device(DEV):
        model = cls(**config).eval()
    torch.set_default_dtype(FP32)
    return model


def peak(name, model, call):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before, t0 = torch.cuda.memory_allocated(), time.time()
    with torch.inference_mode():
        out = call()
    torch.cuda.synchronize()
    RESULTS[name] = {"gib": (torch.cuda.max_memory_allocated() - before) / GiB, "s": time.time() - t0,
                     "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / GiB}
    print(name, RESULTS[name], flush=True)
    del out


def rand(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=dtype)


def ts(*values):
    return torch.tensor(values, device=DEV)


def main() -> None:
    kl = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    for name, dtype, latent in (("sdxl_vae_fp32", FP32, 4), ("sdxl_vae_fp16", FP16, 4), ("flux_vae_bf16", BF16, 16)):
        vae = build(AutoencoderKL, dtype, latent_channels=latent, **kl)
        peak(name, vae, lambda: vae.decode(rand(1, latent, 128, 128, dtype=dtype)).sample)
        vae = None  # free it before the next one
    unet = build(UNet2DConditionModel, FP16, sample_size=128, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    peak("sdxl_unet_fp16_b2", unet, lambda: unet(
        rand(2, 4, 128, 128, dtype=FP16), ts(500.0, 500.0), rand(2, 77, 2048, dtype=FP16),
        added_cond_kwargs={"text_embeds": rand(2, 1280, dtype=FP16), "time_ids": rand(2, 6, dtype=FP16)}).sample)
    unet = None  # free it before the next one
    fl = build(FluxTransformer2DModel, BF16, guidance_embeds=True)  # the defaults are FLUX.1's
    peak("flux_dev_transformer_bf16", fl, lambda: fl(
        rand(1, 4096, 64, dtype=BF16), rand(1, 512, 4096, dtype=BF16), rand(1, 768, dtype=BF16), ts(0.5),
        torch.zeros(4096, 3, device=DEV), torch.zeros(512, 3, device=DEV), ts(3.5)).sample)
    fl = None  # free it before the next one
    s3 = build(SD3Transformer2DModel, FP16, sample_size=128, patch_size=2, in_channels=16, num_layers=24,
               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    peak("sd3_medium_transformer_fp16_b2", s3, lambda: s3(
        rand(2, 16, 128, 128, dtype=FP16), rand(2, 333, 4096, dtype=FP16), rand(2, 2048, dtype=FP16),
        ts(500.0, 500.0)).sample)
    s3 = None  # free it before the next one
    wvae = build(AutoencoderKLWan, BF16)  # the defaults are Wan 2.1's
    peak("wan_vae_bf16_81", wvae, lambda: wvae.decode(rand(1, 16, 21, 60, 104, dtype=BF16)).sample)
    wvae = None  # free it before the next one
    wan = build(WanTransformer3DModel, BF16, patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                in_channels=36, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", image_dim=1280, added_kv_proj_dim=5120,
                rope_max_seq_len=1024)
    peak("wan_14b_transformer_bf16", wan, lambda: wan(
        rand(1, 36, 21, 60, 104, dtype=BF16), ts(500.0), rand(1, 512, 4096, dtype=BF16),
        encoder_hidden_states_image=rand(1, 257, 1280, dtype=BF16)).sample)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
