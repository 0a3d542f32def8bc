"""Tiny, seeded, random-weight checkpoints of every supported family, built with the real
diffusers classes and component layout (saved with ``save_pretrained``, served from disk like a
real checkpoint). A few MB each. Tokenizers: the demo's byte-level CLIP tokenizer, built locally
(also standing in for T5 / UMT5 tokenizers: the pipelines only call them)."""
from __future__ import annotations

import shutil
from pathlib import Path

from genserve.backends.demo import _write_tokenizer, build_image, build_video, vocab_size

V = vocab_size()


def _tokenizer(out: Path):
    from transformers import CLIPTokenizer

    tok_dir = out / "_tok"
    _write_tokenizer(tok_dir)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    return tok


def _clip(cls, hidden=32, projection=32):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=V, hidden_size=hidden, intermediate_size=64, num_attention_heads=4,
                              num_hidden_layers=2, max_position_embeddings=77, projection_dim=projection,
                              bos_token_id=V - 2, eos_token_id=V - 1, pad_token_id=V - 1))


def _t5(d_model=32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=V, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=V - 1, eos_token_id=V - 1))


def _kl_vae(latent: int, **kw):
    """An AutoencoderKL with 4 blocks: the real 8× spatial scale factor, tiny channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=latent,
                         norm_num_groups=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **kw)


def build_sdxl(out: Path, force_zeros: bool = True) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8,
    )
    tok = _tokenizer(out)
    pipe = StableDiffusionXLPipeline(
        vae=_kl_vae(4, force_upcast=True), text_encoder=_clip(CLIPTextModel),
        text_encoder_2=_clip(CLIPTextModelWithProjection),
        tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=force_zeros,
    )
    pipe.save_pretrained(out)


def build_flux(out: Path, guidance_embeds: bool = True) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=[4, 6, 6])
    tok = _tokenizer(out)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_kl_vae(16, shift_factor=0.1159,
                        scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
                        text_encoder=_clip(CLIPTextModel), tokenizer=tok, text_encoder_2=_t5(32), tokenizer_2=tok,
                        transformer=transformer)
    pipe.save_pretrained(out)


def build_sd3(out: Path) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64, out_channels=16,
                                        pos_embed_max_size=8)
    tok = _tokenizer(out)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_kl_vae(16, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(CLIPTextModelWithProjection), tokenizer=tok,
        text_encoder_2=_clip(CLIPTextModelWithProjection), tokenizer_2=tok, text_encoder_3=_t5(64), tokenizer_3=tok,
    )
    pipe.save_pretrained(out)


def build_wan_i2v(out: Path) -> None:
    import torch
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline,
                           WanTransformer3DModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, image_dim=32, added_kv_proj_dim=24,
    )
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=V - 1, eos_token_id=V - 1))
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=32, intermediate_size=64,
                                                     patch_size=8))
    pipe = WanImageToVideoPipeline(
        tokenizer=_tokenizer(out), text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=CLIPImageProcessor(crop_size=32, size=32), image_encoder=image_encoder, transformer=transformer,
    )
    pipe.save_pretrained(out)


BUILDERS = {
    "sd": build_image,  # SD 1.x/2.x: the demo image model (StableDiffusionPipeline)
    "sdxl": build_sdxl,
    "sdxl-nozeros": lambda out: build_sdxl(out, force_zeros=False),
    "flux-dev": build_flux,
    "flux-schnell": lambda out: build_flux(out, guidance_embeds=False),
    "sd3": build_sd3,
    "wan": build_video,
    "wan-i2v": build_wan_i2v,
}


def build_all(root: Path, names=tuple(BUILDERS)) -> dict[str, Path]:
    out = {}
    for name in names:
        path = Path(root) / name
        if not (path / "model_index.json").exists():
            path.mkdir(parents=True, exist_ok=True)
            BUILDERS[name](path)
        out[name] = path
    return out
