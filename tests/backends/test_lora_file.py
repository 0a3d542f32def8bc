"""Adapter files read without torch: the safetensors header, both key layouts, and the checks
against the base model's denoiser (tests/lora_adapters.py builds them with PEFT)."""
import json
import struct

import pytest

from genserve.backends.demo import ensure_demo_model
from genserve.backends.lora_file import LoraFileError, base_modules, read_adapter, read_header
from tests.lora_adapters import save_adapter


@pytest.fixture(scope="module")
def demo_image(tmp_path_factory):
    return ensure_demo_model("image", tmp_path_factory.mktemp("models") / "demo-image")


@pytest.fixture(scope="module")
def modules(demo_image):
    return base_modules(demo_image)


def test_base_modules_come_from_the_weights_header(modules):
    assert modules["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == (64, 32)
    assert modules["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"] == (64, 64)


@pytest.mark.parametrize("layout", ["peft", "diffusers", "kohya"])
def test_layouts_parse_to_the_same_layers(layout, demo_image, modules, tmp_path):
    data = save_adapter(tmp_path / "a.safetensors", demo_image, rank=6, layout=layout).read_bytes()
    info = read_adapter(data, modules)
    assert info.rank == 6 and info.dtype == "F32"
    assert info.targets == ["to_k", "to_out.0", "to_q", "to_v"]
    assert len(info.layers) == 32  # 4 transformer blocks (down 1, mid 1, up 2) x 2 attentions x 4 projections
    assert {layer.module for layer in info.layers} <= set(modules)
    assert info.layout == ("kohya" if layout == "kohya" else "peft")
    assert info.bytes == sum(t.end - t.start for t in read_header(data)[0].values())
    assert all(layer.alpha for layer in info.layers) == (layout == "kohya")


def test_wrong_shapes_name_the_module(demo_image, modules, tmp_path):
    import torch
    from safetensors.torch import save_file

    t = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": torch.ones(4, 64),
         "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": torch.ones(64, 4)}
    save_file(t, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraFileError) as e:
        read_adapter((tmp_path / "bad.safetensors").read_bytes(), modules)
    assert e.value.module == "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert "64x64" in str(e.value) and "64x32" in str(e.value)


def test_unknown_module_and_missing_half_are_refused(modules, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"unet.nope.to_q.lora_A.weight": torch.ones(2, 8), "unet.nope.to_q.lora_B.weight": torch.ones(8, 2)},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(LoraFileError, match="no such linear layer") as e:
        read_adapter((tmp_path / "x.safetensors").read_bytes(), modules)
    assert e.value.module == "nope.to_q"
    save_file({"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 64)},
              str(tmp_path / "y.safetensors"))
    with pytest.raises(LoraFileError, match="no up"):
        read_adapter((tmp_path / "y.safetensors").read_bytes(), modules)


def test_not_safetensors_is_refused_without_unpickling(tmp_path):
    import pickle

    with pytest.raises(LoraFileError, match="not a safetensors file"):
        read_header(pickle.dumps({"a": 1}))  # a pickle's first 8 bytes are no sane length
    with pytest.raises(LoraFileError, match="not a safetensors file"):
        read_header(b"abc")
    header = json.dumps({"w.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 32]}}).encode()
    with pytest.raises(LoraFileError, match="byte range"):
        read_header(struct.pack("<Q", len(header)) + header + b"\0" * 32)  # 2x2 F32 is 16 bytes, not 32


def test_text_encoder_layers_are_refused(modules):
    header = json.dumps({"text_encoder.layers.0.q_proj.lora_A.weight": {"dtype": "F32", "shape": [1, 1],
                                                                        "data_offsets": [0, 4]}}).encode()
    with pytest.raises(LoraFileError, match="text-encoder") as e:
        read_adapter(struct.pack("<Q", len(header)) + header + b"\0" * 4, modules)
    assert e.value.module == "text_encoder.layers.0.q_proj.lora_A.weight"
