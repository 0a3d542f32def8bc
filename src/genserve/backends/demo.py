"""Built-in demo models: real diffusers pipelines with tiny, seeded random weights.

They are built once into a directory with ``save_pretrained`` and then served through the
same ``from_pretrained`` path a real checkpoint takes. They produce noise, quickly.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path



def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode char.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _write_tokenizer(out: Path) -> None:
    """A byte-level CLIP tokenizer with no merges: every byte is a token."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.json"
        merges = Path(tmp) / "merges.txt"
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        merges.write_text("#version: 0.2\n")
        tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
        tok.save_pretrained(out)


def vocab_size() -> int:
    return 256 * 2 + 2


def build_image(out: Path, seed: int = 0) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size(), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=vocab_size() - 2, eos_token_id=vocab_size() - 1,
        pad_token_id=vocab_size() - 1,
    ))
    tok_dir = out / "_tok"
    _write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)


def build_video(out: Path, seed: int = 0) -> None:
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import CLIPTokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=vocab_size() - 1, eos_token_id=vocab_size() - 1,
    ))
    tok_dir = out / "_tok"
    _write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(out)


def build_i2v(out: Path, seed: int = 0) -> None:
    """Wan 2.1-style image-to-video: the text-to-video parts plus a CLIP vision encoder for the
    conditioning frame (the transformer takes 16 noise + 4 mask + 16 frame-latent channels)."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import (CLIPImageProcessor, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel, UMT5Config,
                              UMT5EncoderModel)

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=32, added_kv_proj_dim=24,
    )
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=vocab_size() - 1, eos_token_id=vocab_size() - 1,
    ))
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=32, intermediate_size=64,
                                                     patch_size=8))
    tok_dir = out / "_tok"
    _write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=CLIPImageProcessor(crop_size=32, size=32), image_encoder=image_encoder,
        transformer=transformer,
    )
    pipe.save_pretrained(out)


# Keyed by the demo source's name (``demo:<name>``).
BUILDERS = {"image": build_image, "video": build_video, "i2v": build_i2v}
DEMO_KINDS = tuple(BUILDERS)


def ensure_demo_model(kind: str, out: Path) -> Path:
    """Build the demo model into ``out`` unless a complete build is already there."""
    out = Path(out)
    if (out / "model_index.json").exists():
        return out
    tmp = out.with_name(out.name + f".building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    BUILDERS[kind](tmp)
    # Atomic publish: a half-written model directory is never mistaken for a complete one.
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build genserve's demo models")
    p.add_argument("kind", choices=DEMO_KINDS)
    p.add_argument("out", type=Path)
    a = p.parse_args(argv)
    ensure_demo_model(a.kind, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
