"""One settings object for the engine, built by both drivers: the server's ``genserve.toml``
(``[server]`` keys) and the simulator's scenario (``[engine]`` keys) — the same names, defaults
and checks, so a scenario can set everything the server can."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .policies.autoscale import Autoscaler
from .policies.batching import BATCHING
from .policies.liveness import Liveness
from .policies.placement import PLACEMENT
from .policies.residency import RESIDENCY
from .policies.retry import Backoff, RetryPolicy
from .types import ModelLimits


@dataclass(frozen=True)
class EngineSettings:
    models: Mapping[str, ModelLimits]
    aging_s: float = 30.0
    retry: RetryPolicy = RetryPolicy()
    # Off unless the driver hears heartbeats (the server does; unit tests and the simulator do not).
    liveness: Liveness = Liveness.OFF  # type: ignore[attr-defined]
    batching: str = "greedy"
    placement: str = "warm-first"
    residency: str = "lru"
    saturation: float = 0.9  # warm workers busier than this count as saturated (load elsewhere)
    preload: bool = False
    preload_min_probability: float = 0.2
    autoscaler: Autoscaler | None = None
    fair_share: bool = True  # across tenants inside a priority class (queues.py); jobs without one unaffected
    batch_id_prefix: str = "b"
    lora_memory: int | None = 1 << 30  # LoRA adapter bytes each worker keeps resident (None: unlimited)

    def __post_init__(self) -> None:
        for name, table in (("batching", BATCHING), ("placement", PLACEMENT), ("residency", RESIDENCY)):
            if getattr(self, name) not in table:
                raise ValueError(f"unknown {name} policy {getattr(self, name)!r}; one of {', '.join(table)}")


# The engine's keys, shared by [server] in genserve.toml and [engine] in a scenario, with defaults.
ENGINE_KEYS: dict[str, Any] = {
    "aging_s": 30.0, "max_attempts": 3, "retry_backoff_s": 5.0, "retry_backoff_max_s": 60.0, "fallback_after": 2,
    "placement": "warm-first", "residency": "lru", "saturation": 0.9, "preload": False,
    "preload_min_probability": 0.2, "fair_share": True, "lora_memory_mb": 1024.0,
}


def engine_settings(models: Mapping[str, ModelLimits], options: Mapping[str, Any], *,
                    fallbacks: Mapping[str, str] | None = None, liveness: Liveness | None = None,
                    autoscaler: Autoscaler | None = None, batch_id_prefix: str = "b") -> EngineSettings:
    """``options``: values for ``ENGINE_KEYS`` (validated by the caller's parser; missing keys take
    the defaults)."""
    o = {**ENGINE_KEYS, **{k: v for k, v in options.items() if k in ENGINE_KEYS}}
    retry = RetryPolicy(
        max_attempts=int(o["max_attempts"]), fallback_after=int(o["fallback_after"]),
        backoff=Backoff(first_s=0.0, base_s=float(o["retry_backoff_s"]), factor=2.0,
                        max_s=float(o["retry_backoff_max_s"]), jitter=0.2),
        fallbacks=dict(fallbacks or {}),
    )
    return EngineSettings(
        dict(models), aging_s=float(o["aging_s"]), retry=retry, liveness=liveness or Liveness.OFF,  # type: ignore[attr-defined]
        placement=o["placement"], residency=o["residency"], saturation=float(o["saturation"]),
        preload=bool(o["preload"]), preload_min_probability=float(o["preload_min_probability"]),
        autoscaler=autoscaler, batch_id_prefix=batch_id_prefix, fair_share=bool(o["fair_share"]),
        lora_memory=int(float(o["lora_memory_mb"]) * (1 << 20)),
    )
