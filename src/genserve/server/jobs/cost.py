"""Cost accounting, pure: which price a device pays, and how a batch's device time is shared.

A batch holds its device from dispatch to ``batch_done``; that span (load + inference + output
writes) is the batch's device-seconds. Each job of the batch is charged a share proportional to its
work (pixels × frames); jobs of one batch key have equal shapes today, so shares are equal, but the
rule keeps holding when step-level batching mixes shapes. Canceled or failed jobs of the batch pay
their share too: the device was held for them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence


def device_type(device: str, device_name: str | None, prices: Mapping[str, float]) -> str:
    """The price-table key of a worker: ``cpu`` for CPU workers; for a GPU the longest price key found
    in its name ("NVIDIA H100 80GB HBM3" -> ``H100``), else ``gpu``."""
    if not device.startswith("cuda"):
        return "cpu"
    name = (device_name or "").upper()
    hits = [k for k in prices if k not in ("cpu", "gpu") and k.upper() in name]
    return max(hits, key=len) if hits else "gpu"


def job_weight(width: int, height: int, num_frames: int) -> float:
    """Work of one job, for apportioning: pixels × frames (an image is one frame)."""
    return float(width * height * max(1, num_frames))


def apportion(total: float, weights: Sequence[float]) -> list[float]:
    """Split ``total`` by ``weights`` (equal split when they are all zero). The shares sum to
    ``total`` exactly in floating point: the last share takes the rounding remainder."""
    n = len(weights)
    if n == 0:
        return []
    w_sum = float(sum(weights))
    shares = [total * w / w_sum for w in weights] if w_sum > 0 else [total / n] * n
    shares[-1] = total - sum(shares[:-1])
    return shares


def cost_usd(device_seconds: float, price_per_hour: float) -> float:
    return device_seconds * price_per_hour / 3600.0
