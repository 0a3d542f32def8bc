"""Tiny random LoRA adapters for the tests, built with PEFT on a model's denoiser and saved with
safetensors: B matrices are random and non-zero (``init_lora_weights=False``), so an adapter
changes the output. Layouts: ``peft`` (lora_A / lora_B, as PEFT saves them), ``diffusers``
(``unet.<module>.lora.down.weight``, as ``save_lora_weights`` writes them) and ``kohya``
(``lora_unet_<module>.lora_down.weight`` + ``.alpha``)."""
from __future__ import annotations

from pathlib import Path

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def adapter_tensors(model_dir: Path, rank: int = 4, seed: int = 0, targets=ATTENTION, layout: str = "peft",
                    amplitude: float = 1.0) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    comp = "unet" if (Path(model_dir) / "unet").is_dir() else "transformer"
    if comp == "unet":
        from diffusers import UNet2DConditionModel as Cls
    else:
        from diffusers import WanTransformer3DModel as Cls
    model = Cls.from_pretrained(Path(model_dir) / comp)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False))
    sd = {k: (v * amplitude).contiguous() for k, v in get_peft_model_state_dict(model).items()}
    if layout == "peft":
        return sd
    out = {}
    for k, v in sd.items():
        module, _, role = k.rpartition(".lora_")
        down = role.startswith("A")
        if layout == "diffusers":
            out[f"{comp}.{module}.lora.{'down' if down else 'up'}.weight"] = v
        else:  # kohya
            flat = f"lora_{comp}_" + module.replace(".", "_")
            out[f"{flat}.lora_{'down' if down else 'up'}.weight"] = v
            out[f"{flat}.alpha"] = torch.tensor(float(rank))
    return out


def save_adapter(path: Path, model_dir: Path, **kw) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(model_dir, **kw), str(path))
    return path
