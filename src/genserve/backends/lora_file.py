"""LoRA adapter files, read without torch: the safetensors header (an 8-byte little-endian length,
then a JSON table of tensors) is parsed here by hand, so the server can validate an upload without
loading the ML stack, and a pickle is never opened.

An adapter is a set of low-rank pairs on linear layers of the denoiser: for module ``m`` with
weight ``W`` (out x in), ``down`` (A, rank x in) and ``up`` (B, out x rank) and an optional
``alpha``; the layer's output gains ``scale * (alpha / rank) * B(A(x))``. Two key layouts are read:

- diffusers / PEFT: ``[unet.|transformer.|base_model.model.]<module>.lora_A.weight`` / ``lora_B``,
  or ``.lora.down.weight`` / ``.lora.up.weight``, or ``.lora_down.weight`` / ``.lora_up.weight``;
  ``<module>.alpha`` optional;
- kohya / A1111: ``lora_unet_<module with _ for .>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (``lora_transformer_`` for DiT models); the underscored name is resolved against the
  base model's module table (``base_modules``), as diffusers' converter does.

Text-encoder layers (``text_encoder.``, ``lora_te_``) are recognised and refused: genserve applies
adapters to the denoiser only (docs/lora.md).
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER = 64 << 20  # a header larger than this is not an adapter we would load
DENOISERS = ("unet", "transformer")
_PREFIXES = ("base_model.model.", "unet.", "transformer.")
_TEXT = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".lora_down.weight", ".lora_up.weight"))


class LoraFileError(ValueError):
    """The file is not a usable adapter; ``module`` names the layer at fault when there is one."""

    def __init__(self, message: str, module: str | None = None) -> None:
        super().__init__(f"{module}: {message}" if module else message)
        self.module = module


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class LoraLayer:
    module: str  # dotted path inside the denoiser
    rank: int
    in_features: int
    out_features: int
    down: str  # tensor names in the file
    up: str
    alpha: str | None = None


@dataclass(frozen=True)
class LoraInfo:
    layers: tuple[LoraLayer, ...]
    dtype: str
    bytes: int  # tensor bytes of the file (what host memory holds)
    layout: str  # peft | kohya
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers)

    @property
    def targets(self) -> list[str]:
        """The module kinds targeted (the last part of each path: ``to_q``, ``to_out.0``, ...)."""
        return sorted({_kind(layer.module) for layer in self.layers})


def _kind(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def read_header(data: bytes) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors a safetensors file holds (name -> dtype, shape, byte range) and its metadata.
    Raises LoraFileError for anything that is not a well-formed safetensors file."""
    if len(data) < 8:
        raise LoraFileError("is not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise LoraFileError("is not a safetensors file (its header length does not fit the file; a pickled "
                            ".bin/.pt/.ckpt is never accepted)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError):
        raise LoraFileError("is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoraFileError("is not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    body = len(data) - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, t in header.items():
        try:
            dtype, shape, (start, end) = t["dtype"], tuple(int(s) for s in t["shape"]), t["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise LoraFileError(f"tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPE_BYTES:
            raise LoraFileError(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (0 <= start <= end <= body) or end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise LoraFileError(f"tensor {name!r}: its byte range does not match its shape and dtype")
        tensors[name] = TensorInfo(dtype, shape, int(start), int(end))
    return tensors, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _split(name: str) -> tuple[str, str, str] | None:
    """(module, role, layout) for a tensor name: role is down | up | alpha."""
    for down, up in _PAIRS:
        for suffix, role in ((down, "down"), (up, "up")):
            if name.endswith(suffix):
                return name[: -len(suffix)], role, "peft"
    if name.endswith(".alpha"):
        return name[: -len(".alpha")], "alpha", "peft"
    return None


def parse_adapter(tensors: Mapping[str, TensorInfo], modules: Mapping[str, tuple[int, int]] | None = None,
                  metadata: Mapping[str, str] | None = None) -> LoraInfo:
    """The adapter's layers, checked against ``modules`` (the base denoiser's linear layers:
    dotted path -> (out, in); None: not known here, only the file's own consistency is checked)."""
    if not tensors:
        raise LoraFileError("holds no tensors")
    groups: dict[str, dict[str, str]] = {}
    layout = "peft"
    for name in tensors:
        if name.startswith(_TEXT):
            raise LoraFileError("is a text-encoder layer; genserve applies adapters to the denoiser only", name)
        got = _split(name)
        if got is None:
            raise LoraFileError("is not a LoRA tensor (expected .lora_A/.lora_B, .lora.down/.lora.up, "
                                ".lora_down/.lora_up or .alpha)", name)
        module, role, _ = got
        if module.startswith(("lora_unet_", "lora_transformer_")):
            layout = "kohya"
            module = _kohya(module, modules)
        else:
            for p in _PREFIXES:
                module = module.removeprefix(p)
        if role in groups.setdefault(module, {}):
            raise LoraFileError(f"has two {role} tensors", module)
        groups[module][role] = name
    layers = []
    for module, g in sorted(groups.items()):
        if "down" not in g or "up" not in g:
            raise LoraFileError("has " + ("no up (B) tensor" if "up" not in g else "no down (A) tensor"), module)
        d, u = tensors[g["down"]], tensors[g["up"]]
        if len(d.shape) != 2 or len(u.shape) != 2:
            raise LoraFileError("is not a linear layer's LoRA (convolution adapters are not supported)", module)
        rank, n_in = d.shape
        n_out, rank_up = u.shape
        if rank != rank_up or rank < 1:
            raise LoraFileError(f"down has rank {rank} but up has rank {rank_up}", module)
        if d.dtype not in FLOAT_DTYPES or u.dtype not in FLOAT_DTYPES:
            raise LoraFileError(f"has dtype {d.dtype}/{u.dtype}; adapters must be floating point", module)
        if "alpha" in g and math.prod(tensors[g["alpha"]].shape) != 1:
            raise LoraFileError("alpha must be a single number", module)
        if modules is not None:
            if module not in modules:
                raise LoraFileError("no such linear layer in the base model's denoiser", module)
            want = modules[module]
            if (n_out, n_in) != want:
                raise LoraFileError(f"is {n_out}x{n_in} (out x in) in the adapter but {want[0]}x{want[1]} in the "
                                    "base model", module)
        layers.append(LoraLayer(module, rank, n_in, n_out, g["down"], g["up"], g.get("alpha")))
    dtypes = {tensors[x].dtype for layer in layers for x in (layer.down, layer.up)}
    nbytes = sum(t.end - t.start for t in tensors.values())
    return LoraInfo(tuple(layers), "/".join(sorted(dtypes)), nbytes, layout, dict(metadata or {}))


def _kohya(module: str, modules: Mapping[str, tuple[int, int]] | None) -> str:
    """``lora_unet_down_blocks_1_attentions_0_..._to_q`` -> the dotted module it names (underscores
    inside names like ``down_blocks`` are ambiguous, so the base model's table decides)."""
    flat = module.removeprefix("lora_unet_").removeprefix("lora_transformer_")
    if modules is None:
        raise LoraFileError("kohya-style keys need the base model's module table to be resolved", module)
    table = {m.replace(".", "_"): m for m in modules}
    if flat not in table:
        raise LoraFileError("no such linear layer in the base model's denoiser", module)
    return table[flat]


def read_adapter(data: bytes, modules: Mapping[str, tuple[int, int]] | None = None) -> LoraInfo:
    tensors, meta = read_header(data)
    return parse_adapter(tensors, modules, meta)


def adapter_file(path: Path) -> Path:
    """The adapter file of a ``source`` path: the file itself, or in a directory its single
    ``.safetensors`` (diffusers saves ``pytorch_lora_weights.safetensors``)."""
    if path.is_dir():
        preferred = path / "pytorch_lora_weights.safetensors"
        if preferred.is_file():
            return preferred
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise LoraFileError(f"{path}: expected one .safetensors file in the directory, found {len(found)}")
        return found[0]
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path}: only .safetensors adapters are accepted (never a pickle)")
    return path


def _read_prefix(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a (possibly large) safetensors file, reading its header only."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraFileError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise LoraFileError(f"{path}: header too large")
        raw = f.read(n)
    header = json.loads(raw)
    header.pop("__metadata__", None)
    return {k: TensorInfo(v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()}


def base_modules(model_dir: Path) -> dict[str, tuple[int, int]] | None:
    """The linear layers of a diffusers model's denoiser (``unet/`` or ``transformer/``): dotted
    path -> (out, in), from its safetensors headers (sharded or not). None: no such weights here
    (a remote model not fetched yet): adapters are then checked for consistency only."""
    for comp in DENOISERS:
        d = Path(model_dir) / comp
        files = sorted(d.glob("*.safetensors")) if d.is_dir() else []
        if not files:
            continue
        out: dict[str, tuple[int, int]] = {}
        for f in files:
            for name, t in _read_prefix(f).items():
                if name.endswith(".weight") and len(t.shape) == 2:
                    out[name[: -len(".weight")]] = (t.shape[0], t.shape[1])
        return out
    return None
