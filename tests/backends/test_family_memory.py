"""Working-memory estimates for real published configurations, from their config values alone (no
weights, no torch).

The factor: each estimate must lie between a *lower bound* — tensors that provably coexist at the
peak of the phase that dominates, computed here independently — and 3× that bound. 3× because at
the peak the model counts at most four live buffers of the widest tensor (the upsampled map, its
conv, norm and activation outputs) where the bound counts two, plus smaller ones; an estimate
outside it has either missed a tensor that must exist, or counted copies the architecture does not
keep (what the old estimate did: FLUX.1-dev 1024² at 6.0 GiB, Wan 2.1 14B 832×480×81 at 110 GiB).

And against measurements: ``MEASURED_GIB`` are peaks measured on an H200 (CUDA allocator, peak
above the weights, one forward / decode of random-weight components built at these published
configs with diffusers 0.42.1); each phase's estimate must be within 0.75–1.5× of its figure
(under-estimating is the side that costs an OOM, so it gets the tighter bound).
"""
from genserve.backends.families import Options, flux, sd3, sdxl, wan

GiB = 1 << 30
BF16 = FP16 = 2

# Published configs (the fields the estimate reads), from the model repositories' config.json files.
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0
    "_pipeline": {"force_zeros_for_empty_prompt": True},
    "unet": {"block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]},
    "vae": {"block_out_channels": [128, 256, 512, 512], "force_upcast": True},
}
FLUX_DEV = {  # black-forest-labs/FLUX.1-dev
    "transformer": {"num_attention_heads": 24, "attention_head_dim": 128, "guidance_embeds": True},
    "vae": {"block_out_channels": [128, 256, 512, 512]},
}
SD3_MEDIUM = {  # stabilityai/stable-diffusion-3-medium-diffusers
    "transformer": {"num_attention_heads": 24, "attention_head_dim": 64, "patch_size": 2, "pos_embed_max_size": 192},
    "vae": {"block_out_channels": [128, 256, 512, 512]},
}
WAN_14B = {  # Wan-AI/Wan2.1-I2V-14B-480P-Diffusers
    "transformer": {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "patch_size": [1, 2, 2]},
    "vae": {"base_dim": 96, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "scale_factor_temporal": 4,
            "scale_factor_spatial": 8},
}


def adapter(mod, pipeline, configs, **opts):
    return mod.Adapter(mod.traits(pipeline, configs), configs, Options(**opts))


def within(estimate, lower):
    assert lower <= estimate <= 3 * lower, (estimate / GiB, lower / GiB)


def test_sdxl_1024_is_dominated_by_the_float32_vae_decode():
    a = adapter(sdxl, "StableDiffusionXLPipeline", SDXL)
    est = a.working_bytes(1, 1024, 1024, 0, 5.0, FP16)
    # force_upcast: the decoder runs in float32; at full resolution the 256-channel map upsampled
    # from the block below and the conv output of the same size coexist.
    within(est, 1024 * 1024 * 256 * 2 * 4)
    ph = a.working_phases(1, 1024, 1024, 0, 5.0, FP16)
    assert ph["vae"] > ph["denoiser"]
    # CFG: SDXL batches [uncond, cond] — two copies of the UNet activations when guidance > 1.
    cfg, plain = (a.working_phases(1, 1024, 1024, 0, g, FP16)["denoiser"] for g in (5.0, 1.0))
    assert cfg == 2 * plain


def test_flux_dev_1024_counts_packed_tokens_plus_text_and_no_cfg_copy():
    a = adapter(flux, "FluxPipeline", FLUX_DEV)
    est = a.working_bytes(1, 1024, 1024, 0, 3.5, BF16)
    within(est, 1024 * 1024 * 256 * 2 * BF16)  # the same VAE decoder, in bf16
    assert est < 6.0 * GiB / 2
    ph = a.working_phases(1, 1024, 1024, 0, 3.5, BF16)
    tokens = (1024 // 16) ** 2 + 512  # 2×2-packed latents + T5 tokens, in one joint stream
    hidden = 24 * 128
    assert ph["denoiser"] >= tokens * 5 * hidden * BF16  # hidden states, q, k, v, attention output
    # guidance is an embedded input: one pass per step whatever its value
    assert a.working_phases(1, 1024, 1024, 0, 1.0, BF16) == ph
    short = adapter(flux, "FluxPipeline", FLUX_DEV, max_sequence_length=256)
    shorter = short.working_phases(1, 1024, 1024, 0, 3.5, BF16)
    assert shorter["denoiser"] < ph["denoiser"]


def test_sd3_counts_patched_tokens_and_cfg_copies():
    a = adapter(sd3, "StableDiffusion3Pipeline", SD3_MEDIUM)
    one, two = (a.working_phases(1, 1024, 1024, 0, g, FP16)["denoiser"] for g in (1.0, 7.0))
    assert two == 2 * one  # the unconditional pass is batched with the conditional one
    tokens = (1024 // 16) ** 2 + 77 + 256
    within(one, tokens * 5 * 24 * 64 * FP16)
    assert a.traits.size_multiple == 16 and a.traits.max_side == 192 * 2 * 8


def test_wan_14b_832x480x81_attends_over_patched_tokens_and_decodes_in_chunks():
    a = adapter(wan, "WanImageToVideoPipeline", WAN_14B)
    est = a.working_bytes(1, 832, 480, 81, 5.0, BF16)
    tokens = 21 * (480 // 16) * (832 // 16)  # (81-1)/4+1 latent frames, 1×2×2 patches: 32 760
    # Lower bound: one block's attention phase over every token (hidden states, q, k, v, output),
    # and, separately, one decoded chunk (4 frames) at full resolution, its 192-channel input and output.
    lower = max(tokens * 5 * 40 * 128 * BF16, 4 * 832 * 480 * 192 * 2 * BF16)
    within(est, lower)
    assert est < 110 * GiB / 10
    # CFG: the unconditional pass runs after the conditional one: no second copy
    assert a.working_bytes(1, 832, 480, 81, 5.0, BF16) == a.working_bytes(1, 832, 480, 81, 1.0, BF16)
    # chunked decode: 4× the frames do not cost 4× the decode (only the decoded video grows)
    ph81, ph21 = a.working_phases(1, 832, 480, 81, 5.0, BF16), a.working_phases(1, 832, 480, 21, 5.0, BF16)
    assert ph81["vae"] < 1.5 * ph21["vae"]


def test_estimates_scale_with_the_batch():
    a = adapter(flux, "FluxPipeline", FLUX_DEV)
    assert a.working_bytes(4, 1024, 1024, 0, 3.5, BF16) == 4 * a.working_bytes(1, 1024, 1024, 0, 3.5, BF16)


# Measured on an NVIDIA H200 (torch 2.11, diffusers 0.42.1), peak allocated minus allocated before
# the call, under inference_mode; the SDXL UNet and SD3 transformer with batch 2 (CFG's two copies).
MEASURED_GIB = {
    "sdxl_vae_fp32": 4.800, "sdxl_vae_fp16": 2.377, "flux_vae_bf16": 2.378, "sdxl_unet_fp16_b2": 0.318,
    "flux_dev_transformer_bf16": 0.461, "sd3_medium_transformer_fp16_b2": 0.317,
    "wan_vae_bf16_81": 4.384, "wan_14b_transformer_bf16": 3.492,
}


def test_estimates_are_close_to_peaks_measured_on_a_gpu():
    from genserve.backends.families.memory import kl_decode_bytes

    xl = adapter(sdxl, "StableDiffusionXLPipeline", SDXL).working_phases(1, 1024, 1024, 0, 5.0, FP16)
    fx = adapter(flux, "FluxPipeline", FLUX_DEV).working_phases(1, 1024, 1024, 0, 3.5, BF16)
    s3 = adapter(sd3, "StableDiffusion3Pipeline", SD3_MEDIUM).working_phases(1, 1024, 1024, 0, 7.0, FP16)
    wn = adapter(wan, "WanImageToVideoPipeline", WAN_14B).working_phases(1, 832, 480, 81, 5.0, BF16)
    estimates = {
        "sdxl_vae_fp32": xl["vae"], "sdxl_vae_fp16": kl_decode_bytes(SDXL["vae"], 1024, 1024, 1, FP16),
        "flux_vae_bf16": fx["vae"], "sdxl_unet_fp16_b2": xl["denoiser"], "flux_dev_transformer_bf16": fx["denoiser"],
        "sd3_medium_transformer_fp16_b2": s3["denoiser"], "wan_vae_bf16_81": wn["vae"],
        "wan_14b_transformer_bf16": wn["denoiser"],
    }
    ratios = {k: estimates[k] / (MEASURED_GIB[k] * GiB) for k in MEASURED_GIB}
    assert all(0.75 <= r <= 1.5 for r in ratios.values()), ratios
