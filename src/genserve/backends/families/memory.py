"""Working-memory estimates from component configs alone (no weights, no torch): what a batch
needs beyond the weights at its peak. They are hints for ordering work and sizing batches before
a CUDA worker has measured the shape; the engine never fails a job on one (engine/memory.py).

The model, per phase (the peak is the larger phase, plus the decoded output):
- transformer denoisers: per token alive at once in one block — hidden states, their norm, q, k, v
  and the attention output (6 × hidden) plus the MLP's intermediate and activation (2 × ffn);
  attention itself is fused (SDPA / flash: no tokens² matrix). Tokens are counted *after*
  patching / packing, plus the text tokens in the stream for joint-attention models (FLUX, SD3).
- UNets: the widest level's positions × channels × the tensors alive in its blocks (resnet: 4,
  transformer block with GEGLU feed-forward: 18), plus the skip connections kept for the way up.
- CFG copies: 2 where the pipeline batches the unconditional pass with the conditional one (SD,
  SDXL, SD3), 1 where it runs them one after another (Wan, FLUX's true CFG) or has none.
- VAE decode (AutoencoderKL): at full resolution the upsampled input of the last block and what
  its first resnet makes of it before the conv narrows it (4 live buffers of those channels:
  the upsampled map, its conv, norm and activation outputs) plus the block's own output channels.
  Wan's causal VAE decodes one latent frame (= temporal-factor output frames) at a time and keeps
  2 cached frames per causal convolution.

Checked on an H200 against one forward / decode of random-weight components at the published
configs (peak allocated above the weights): the estimates are 0.80–1.12× the measured peaks
(tests/backends/test_family_memory.py holds the figures).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Cfg = Mapping[str, Any]
DECODE_BUFFERS = 4  # live full-resolution buffers of the widest channels at the decoder's peak


def dit_token_bytes(hidden: int, ffn: int, dtype_bytes: int) -> int:
    return dtype_bytes * (6 * hidden + 2 * ffn)


def dit_bytes(tokens: int, hidden: int, ffn: int, n: int, copies: int, dtype_bytes: int) -> int:
    return n * copies * tokens * dit_token_bytes(hidden, ffn, dtype_bytes)


def unet_bytes(unet: Cfg, lat_w: int, lat_h: int, n: int, copies: int, dtype_bytes: int) -> int:
    chans = [int(c) for c in unet.get("block_out_channels") or (320, 640, 1280, 1280)]
    downs = list(unet.get("down_block_types") or ["CrossAttnDownBlock2D"] * len(chans))
    layers = unet.get("layers_per_block") or 2
    layers = int(layers if isinstance(layers, int) else max(layers))
    widest = skips = 0
    for level, ch in enumerate(chans):
        positions = max(1, (lat_w >> level) * (lat_h >> level))
        live = 18 if "CrossAttn" in str(downs[min(level, len(downs) - 1)]) else 4
        widest = max(widest, positions * ch * live)
        skips += positions * ch * (layers + 1)
    return n * copies * (widest + skips) * dtype_bytes


def kl_decode_bytes(vae: Cfg, width: int, height: int, n: int, dtype_bytes: int) -> int:
    chans = [int(c) for c in vae.get("block_out_channels") or (128, 256, 512, 512)]
    top_in = chans[1] if len(chans) > 1 else chans[0]
    return n * width * height * (DECODE_BUFFERS * top_in + chans[0]) * dtype_bytes


def wan_vae_bytes(vae: Cfg, width: int, height: int, frames: int, n: int, dtype_bytes: int) -> int:
    base = int(vae.get("decoder_base_dim") or vae.get("base_dim") or 96)
    mult = [int(m) for m in vae.get("dim_mult") or (1, 2, 4, 4)]
    res_blocks = int(vae.get("num_res_blocks") or 2)
    t_factor = int(vae.get("scale_factor_temporal") or 4)
    pixels = width * height
    full, top_in = base * mult[0], base * (mult[1] if len(mult) > 1 else mult[0])
    chunk = t_factor * pixels * (DECODE_BUFFERS * top_in + full)
    # Causal-conv caches: 2 frames per conv, (res_blocks + 1) resblocks × 2 convs per level.
    convs = 2 * (res_blocks + 1)
    cache = sum(2 * convs * (pixels >> (2 * lvl)) * base * m for lvl, m in enumerate(mult))
    decoded = max(1, frames) * pixels * 3  # the decoded video, concatenated chunk by chunk
    return n * (chunk + cache + decoded) * dtype_bytes


def output_bytes(n: int, width: int, height: int, frames: int) -> int:
    """The decoded output as float32 (numpy / PIL conversion)."""
    return n * width * height * max(1, frames) * 3 * 4


def generic_phases(configs: Mapping[str, Cfg], n: int, width: int, height: int, frames: int,
                   guidance: float, dtype_bytes: int) -> dict[str, int]:
    """For pipelines no family knows: the denoiser at latent resolution with CFG copies when
    guidance > 1 (the common convention), and an AutoencoderKL-like decode of every frame."""
    copies = 2 if guidance > 1.0 else 1
    lat_w, lat_h = max(1, width // 8), max(1, height // 8)
    if "unet" in configs:
        act = unet_bytes(configs["unet"], lat_w, lat_h, n, copies, dtype_bytes)
    else:
        t = configs.get("transformer") or {}
        hidden = int(t.get("num_attention_heads") or 8) * int(t.get("attention_head_dim") or 64)
        act = dit_bytes(lat_w * lat_h * max(1, frames), hidden, 4 * hidden, n, copies, dtype_bytes)
    vae = kl_decode_bytes(configs.get("vae") or {}, width, height, n * max(1, frames), dtype_bytes)
    return {"denoiser": act, "vae": vae, "output": output_bytes(n, width, height, frames)}
