"""genserve.toml: server settings and the model catalog, validated at the edge.

Every error names the offending key (``models.demo-image.max_batch_size: …``) and is raised before
anything starts. Past this module the rest of the code trusts its inputs.
"""
from __future__ import annotations

import base64
import binascii
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .demo_catalog import DEMO_SOURCES, DEMO_TOML
from .engine.autoscale import Autoscaler, ScaleLimits
from .engine.liveness import Liveness
from .engine.placement import PLACEMENT
from .engine.residency import RESIDENCY
from .engine.settings import ENGINE_KEYS, EngineSettings
from .engine.settings import engine_settings as build_engine_settings
from .engine.types import ModelLimits
from .netconfig import HttpConfig, WebhookPolicy, parse_net_sections

KINDS = ("image", "video")
DTYPES = ("auto", "float32", "float16", "bfloat16")
GIB = 1 << 30
FAULTS_ENV = "GENSERVE_ENABLE_FAULTS"  # fault injection is refused unless this is "1"


class ConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: str
    source: str
    dtype: str = "auto"
    max_batch_size: int = 4
    max_wait_ms: int = 0
    sizes: tuple[tuple[int, int], ...] = ()  # empty: any size within max_pixels
    max_pixels: int = 1024 * 1024
    size_multiple: int = 8
    default_size: tuple[int, int] = (512, 512)
    default_steps: int = 20
    max_steps: int = 100
    default_guidance: float = 5.0
    default_frames: int = 0
    max_frames: int = 0
    frame_stride: int = 1  # video: num_frames - 1 must be a multiple of this (Wan: 4)
    fps: int = 8
    max_queue: int = 256
    max_prompt_chars: int = 2000
    memory_gb: float = 0.0  # weights hint (GiB) until a worker has measured the model
    min_warm: int = 0  # warm pool size: workers that load it at start-up and never idle-unload it
    keep_warm_s: float = 0.0  # stay loaded while requests arrive within this window
    idle_unload_s: float | None = None  # None: the server's default; "never" in TOML disables
    fallback: str | None = None  # retried on this model after repeated failures
    timeout_s: float = 600.0  # a job's deadline: the default, and the most a request may ask for

    def limits(self, server: "ServerConfig") -> ModelLimits:
        idle = self.idle_unload_s if self.idle_unload_s is not None else server.idle_unload_s
        return ModelLimits(self.max_batch_size, self.max_wait_ms / 1000.0, self.max_queue,
                           memory_bytes=int(self.memory_gb * GIB), min_warm=self.min_warm,
                           keep_warm_s=self.keep_warm_s, idle_unload_s=None if idle < 0 else idle)

    def size_allowed(self, w: int, h: int) -> bool:
        return (w, h) in self.sizes if self.sizes else w * h <= self.max_pixels

    def public(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "source": self.source, "dtype": self.dtype,
            "max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait_ms,
            "sizes": [f"{w}x{h}" for w, h in self.sizes] or None, "max_pixels": self.max_pixels,
            "size_multiple": self.size_multiple, "default_size": "%dx%d" % self.default_size,
            "default_steps": self.default_steps, "max_steps": self.max_steps,
            "default_guidance": self.default_guidance,
            "default_frames": self.default_frames or None, "max_frames": self.max_frames or None,
            "frame_stride": self.frame_stride if self.kind == "video" else None,
            "max_queue": self.max_queue, "max_prompt_chars": self.max_prompt_chars,
            "memory_gb": self.memory_gb or None, "min_warm": self.min_warm, "keep_warm_s": self.keep_warm_s,
            "idle_unload_s": self.idle_unload_s,
            "fallback": self.fallback, "timeout_s": self.timeout_s,
        }


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("genserve-data")
    workers: int = 1  # CPU workers when there is no GPU
    aging_s: float = 30.0
    # Residency (docs/residency.md).
    worker_memory_gb: float = 0.0  # CPU workers' memory budget each (0: physical memory / workers)
    host_cache_gb: float = 8.0  # GPU workers: unloaded models kept in host RAM up to this size
    idle_unload_s: float = 120.0  # default for models; < 0 = never
    residency: str = "lru"
    placement: str = "warm-first"
    saturation: float = 0.9  # warm workers busier than this count as saturated (load elsewhere)
    preload: bool = False  # predictive preloading
    preload_min_probability: float = 0.2
    # Failure handling (docs/failure-handling.md).
    max_attempts: int = 3
    retry_backoff_s: float = 5.0  # the second retry waits this long, doubling after (the first is immediate)
    retry_backoff_max_s: float = 60.0
    fallback_after: int = 2  # failed attempts before a model's fallback is tried
    hang_timeout_s: float = 600.0  # a running batch with no progress this long: its worker is killed
    stop_grace_s: float = 10.0  # a canceled / timed-out job not stopped at a step boundary by then: kill
    heartbeat_s: float = 2.0  # how often workers say they are alive
    heartbeat_timeout_s: float = 60.0  # a worker silent this long is killed
    quarantine_after: int = 5  # worker exits within quarantine_window_s before it is no longer restarted
    quarantine_window_s: float = 300.0
    webhook_secret: str | None = None  # "whsec_<base64>"; required for jobs with a webhook
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 1.0  # first redelivery after this, doubling (≤ 5 min)


# US$ per device-hour, by device type: public on-demand list prices (rounded) for the GPUs, and a
# placeholder for a CPU worker (a share of a small VM). Overridden per key by ``[prices]``.
DEFAULT_PRICES: dict[str, float] = {"H100": 2.00, "H200": 2.60, "B200": 4.00, "A100": 1.40, "L40S": 1.00,
                                    "gpu": 2.00, "cpu": 0.10}


@dataclass(frozen=True)
class AutoscaleConfig:
    """``[autoscale]``: the engine's autoscaling policy and the local provider's limits."""

    policy: str = "queue_depth"
    min_devices: int = 1
    max_devices: int = 2
    budget_per_hour: float | None = None
    price_per_hour: float | None = None  # default: the device type's price in [prices]
    scale_down_delay_s: float = 120.0
    interval_s: float = 5.0
    params: dict[str, float] = field(default_factory=dict)  # the policy's own knobs


AUTOSCALE_PARAMS = ("target_queue_s", "headroom", "horizon_s", "lead_s", "period_s", "bucket_s", "baseline")


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection for recovery drills (off unless configured *and* $GENSERVE_ENABLE_FAULTS=1).
    Counts are per worker process; ``lives`` processes of each affected worker misbehave, later
    restarts behave (so a drill tests recovery, not an endless crash loop, unless asked to)."""

    oom_above_batch: int = 0  # raise OutOfMemoryError for batches with more jobs than this
    crash_on_batch: int = 0  # SIGKILL itself at the first step of its Nth batch
    hang_on_batch: int = 0  # sleep forever inside the first step of its Nth batch
    fail_load: tuple[str, ...] = ()  # models whose load raises
    fail_prompt: str = ""  # a batch with a job whose prompt contains this raises (an input the pipeline rejects)
    workers: tuple[str, ...] = ()  # worker ids affected (empty: all)
    lives: int = 1

    def for_worker(self, worker_id: str, life: int) -> dict[str, Any] | None:
        """The faults one worker process applies (a plain dict: it crosses a process boundary)."""
        if (self.workers and worker_id not in self.workers) or life >= self.lives:
            return None
        return {"oom_above_batch": self.oom_above_batch, "crash_on_batch": self.crash_on_batch,
                "hang_on_batch": self.hang_on_batch, "fail_load": list(self.fail_load),
                "fail_prompt": self.fail_prompt}


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    models: dict[str, ModelConfig] = field(default_factory=dict)
    prices: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    faults: FaultConfig | None = None
    autoscale: AutoscaleConfig | None = None
    http: HttpConfig = field(default_factory=HttpConfig)  # [http]: body limit, public URL (netconfig.py)
    webhooks: WebhookPolicy = field(default_factory=WebhookPolicy)  # [webhooks]: SSRF allowlist

    def with_overrides(self, **kw: Any) -> "Config":
        kw = {k: v for k, v in kw.items() if v is not None}
        if "data_dir" in kw:
            kw["data_dir"] = Path(kw["data_dir"])
        if "workers" in kw and kw["workers"] < 0:
            raise ConfigError("server.workers", "must be ≥ 0")
        return replace(self, server=replace(self.server, **kw))

    def model_dir(self, name: str) -> Path:
        """Where a model's weights are loaded from (demo models are built there on first start)."""
        m = self.models[name]
        if m.source in DEMO_SOURCES:  # one build per demo kind, shared by every model that uses it
            return self.server.data_dir / "models" / m.source.replace(":", "-")
        return Path(m.source)


def _type(key: str, value: Any, types: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, types):
        raise ConfigError(key, f"must be {what}, got {value!r}")
    return value


def _int(key: str, v: Any, lo: int, hi: int | None = None) -> int:
    _type(key, v, int, "an integer")
    if v < lo or (hi is not None and v > hi):
        raise ConfigError(key, f"must be between {lo} and {hi}" if hi is not None else f"must be ≥ {lo}")
    return v


def _float(key: str, v: Any, lo: float) -> float:
    _type(key, v, (int, float), "a number")
    if v < lo:
        raise ConfigError(key, f"must be ≥ {lo}")
    return float(v)


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H); raises ValueError."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT")
    return int(parts[0]), int(parts[1])


def _size(key: str, v: Any) -> tuple[int, int]:
    _type(key, v, str, 'a "WIDTHxHEIGHT" string')
    try:
        w, h = parse_size(v)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
    if w <= 0 or h <= 0:
        raise ConfigError(key, "width and height must be positive")
    return w, h


_MODEL_KEYS = {f for f in ModelConfig.__dataclass_fields__ if f != "name"}
_SERVER_KEYS = set(ServerConfig.__dataclass_fields__)


def _parse_model(name: str, raw: Any) -> ModelConfig:
    p = f"models.{name}"
    _check_table(p, raw, _MODEL_KEYS)
    for req in ("kind", "source"):
        if req not in raw:
            raise ConfigError(f"{p}.{req}", "is required")
    kind = _type(f"{p}.kind", raw["kind"], str, "a string")
    if kind not in KINDS:
        raise ConfigError(f"{p}.kind", f"must be one of {', '.join(KINDS)}")
    source = _type(f"{p}.source", raw["source"], str, "a string")
    if source.startswith("demo:") and source not in DEMO_SOURCES:
        raise ConfigError(f"{p}.source", f"unknown demo model; one of {', '.join(DEMO_SOURCES)}")
    if source in DEMO_SOURCES and DEMO_SOURCES[source] != kind:
        raise ConfigError(f"{p}.kind", f"{source} is a {DEMO_SOURCES[source]} model")
    kw: dict[str, Any] = {"name": name, "kind": kind, "source": source}
    if "dtype" in raw:
        kw["dtype"] = _type(f"{p}.dtype", raw["dtype"], str, "a string")
        if kw["dtype"] not in DTYPES:
            raise ConfigError(f"{p}.dtype", f"must be one of {', '.join(DTYPES)}")
    ints = {"max_batch_size": 1, "max_wait_ms": 0, "max_pixels": 64, "size_multiple": 1, "default_steps": 1,
            "max_steps": 1, "default_frames": 0, "max_frames": 0, "frame_stride": 1, "fps": 1, "max_queue": 1,
            "max_prompt_chars": 1}
    for k, lo in ints.items():
        if k in raw:
            kw[k] = _int(f"{p}.{k}", raw[k], lo)
    if "default_guidance" in raw:
        kw["default_guidance"] = _float(f"{p}.default_guidance", raw["default_guidance"], 0.0)
    for k in ("memory_gb", "keep_warm_s"):
        if k in raw:
            kw[k] = _float(f"{p}.{k}", raw[k], 0.0)
    if "min_warm" in raw:
        kw["min_warm"] = _int(f"{p}.min_warm", raw["min_warm"], 0)
    if "idle_unload_s" in raw:
        kw["idle_unload_s"] = _seconds_or_never(f"{p}.idle_unload_s", raw["idle_unload_s"])
    if "timeout_s" in raw:
        kw["timeout_s"] = _float(f"{p}.timeout_s", raw["timeout_s"], 0.1)
    if "fallback" in raw:
        kw["fallback"] = _type(f"{p}.fallback", raw["fallback"], str, "a model name")
    if "sizes" in raw:
        _type(f"{p}.sizes", raw["sizes"], list, "a list of sizes")
        kw["sizes"] = tuple(_size(f"{p}.sizes[{i}]", s) for i, s in enumerate(raw["sizes"]))
    if "default_size" in raw:
        kw["default_size"] = _size(f"{p}.default_size", raw["default_size"])
    m = ModelConfig(**kw)
    for i, (w, h) in enumerate(m.sizes):
        if w % m.size_multiple or h % m.size_multiple:
            raise ConfigError(f"{p}.sizes[{i}]", f"must be a multiple of size_multiple ({m.size_multiple})")
    if "default_size" not in raw and m.sizes:
        m = replace(m, default_size=m.sizes[0])
    if not m.size_allowed(*m.default_size):
        raise ConfigError(f"{p}.default_size", "is not an allowed size (see sizes / max_pixels)")
    if m.default_steps > m.max_steps:
        raise ConfigError(f"{p}.default_steps", f"exceeds max_steps ({m.max_steps})")
    if kind == "video":
        if m.max_frames < 1:
            raise ConfigError(f"{p}.max_frames", "is required for video models (≥ 1)")
        if not 1 <= m.default_frames <= m.max_frames:
            raise ConfigError(f"{p}.default_frames", f"must be between 1 and max_frames ({m.max_frames})")
        if (m.default_frames - 1) % m.frame_stride:
            raise ConfigError(f"{p}.default_frames", f"num_frames - 1 must be a multiple of frame_stride ({m.frame_stride})")
    elif m.max_frames or m.default_frames:
        raise ConfigError(f"{p}.max_frames", "only video models take frames")
    return m


def _check_table(key: str, raw: Any, known: set[str]) -> None:
    _type(key, raw, dict, "a table")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", "unknown key")


def _seconds_or_never(key: str, v: Any) -> float:
    """A duration ≥ 0, or "never" (stored as -1)."""
    return -1.0 if v == "never" else _float(key, v, 0.0)


def _parse_server(raw: Any) -> ServerConfig:
    _check_table("server", raw, _SERVER_KEYS)
    kw: dict[str, Any] = {}
    if "host" in raw:
        kw["host"] = _type("server.host", raw["host"], str, "a string")
    if "port" in raw:
        kw["port"] = _int("server.port", raw["port"], 0, 65535)
    if "data_dir" in raw:
        kw["data_dir"] = Path(os.path.expanduser(_type("server.data_dir", raw["data_dir"], str, "a string")))
    if "workers" in raw:
        kw["workers"] = _int("server.workers", raw["workers"], 0)
    floats = {"aging_s": 0.0, "retry_backoff_s": 0.0, "retry_backoff_max_s": 0.0, "hang_timeout_s": 0.1,
              "stop_grace_s": 0.1, "heartbeat_s": 0.05, "heartbeat_timeout_s": 0.1, "quarantine_window_s": 0.0,
              "webhook_backoff_s": 0.0}
    for k, lo in floats.items():
        if k in raw:
            kw[k] = _float(f"server.{k}", raw[k], lo)
    for k in ("max_attempts", "fallback_after", "quarantine_after", "webhook_max_attempts"):
        if k in raw:
            kw[k] = _int(f"server.{k}", raw[k], 1)
    if "webhook_secret" in raw:
        kw["webhook_secret"] = _secret("server.webhook_secret", raw["webhook_secret"])
    for k in ("worker_memory_gb", "host_cache_gb"):
        if k in raw:
            kw[k] = _float(f"server.{k}", raw[k], 0.0)
    if "idle_unload_s" in raw:
        kw["idle_unload_s"] = _seconds_or_never("server.idle_unload_s", raw["idle_unload_s"])
    if "saturation" in raw:
        kw["saturation"] = _float("server.saturation", raw["saturation"], 0.0)
        if kw["saturation"] > 1:
            raise ConfigError("server.saturation", "must be between 0 and 1")
    if "preload_min_probability" in raw:
        kw["preload_min_probability"] = _float("server.preload_min_probability", raw["preload_min_probability"], 0.0)
    if "preload" in raw:
        if not isinstance(raw["preload"], bool):
            raise ConfigError("server.preload", f"must be true or false, got {raw['preload']!r}")
        kw["preload"] = raw["preload"]
    for k, names in (("residency", RESIDENCY), ("placement", PLACEMENT)):
        if k in raw:
            kw[k] = _type(f"server.{k}", raw[k], str, "a string")
            if kw[k] not in names:
                raise ConfigError(f"server.{k}", f"unknown policy {kw[k]!r}; one of {', '.join(names)}")
    s = ServerConfig(**kw)
    if s.heartbeat_timeout_s <= s.heartbeat_s:
        raise ConfigError("server.heartbeat_timeout_s", f"must exceed heartbeat_s ({s.heartbeat_s:g})")
    return s


def _secret(key: str, v: Any) -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of at least 24 random bytes."""
    _type(key, v, str, 'a "whsec_…" string')
    try:
        raw = base64.b64decode(v.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(key, "must be whsec_ followed by base64") from None
    if not v.startswith("whsec_") or len(raw) < 24:
        raise ConfigError(key, "must be whsec_ followed by base64 of at least 24 bytes")
    return v


_FAULT_KEYS = set(FaultConfig.__dataclass_fields__)


def _parse_faults(raw: Any, models: dict[str, ModelConfig]) -> FaultConfig:
    _type("faults", raw, dict, "a table")
    if os.environ.get(FAULTS_ENV) != "1":
        raise ConfigError("faults", f"fault injection is for tests; refused unless ${FAULTS_ENV}=1")
    _check_table("faults", raw, _FAULT_KEYS)
    kw: dict[str, Any] = {}
    for k in ("oom_above_batch", "crash_on_batch", "hang_on_batch"):
        if k in raw:
            kw[k] = _int(f"faults.{k}", raw[k], 0)
    if "lives" in raw:
        kw["lives"] = _int("faults.lives", raw["lives"], 1)
    if "fail_prompt" in raw:
        kw["fail_prompt"] = _type("faults.fail_prompt", raw["fail_prompt"], str, "a string")
    for k in ("fail_load", "workers"):
        if k in raw:
            _type(f"faults.{k}", raw[k], list, "a list of names")
            kw[k] = tuple(_type(f"faults.{k}[{i}]", v, str, "a string") for i, v in enumerate(raw[k]))
    for i, name in enumerate(kw.get("fail_load", ())):
        if name not in models:
            raise ConfigError(f"faults.fail_load[{i}]", f"unknown model {name!r}")
    return FaultConfig(**kw)


def _parse_prices(raw: Any) -> dict[str, float]:
    """``[prices]``: device type -> US$ per hour. Types are matched against the GPU's name
    (``H100`` matches "NVIDIA H100 80GB HBM3"); ``gpu`` is the fallback for an unlisted GPU."""
    _type("prices", raw, dict, "a table of device type = US$ per hour")
    prices = dict(DEFAULT_PRICES)
    for name, v in raw.items():
        prices[name] = _float(f"prices.{name}", v, 0.0)
    return prices


def parse_config(data: dict[str, Any]) -> Config:
    unknown = sorted(set(data) - {"server", "models", "prices", "faults", "autoscale", "http", "webhooks"})
    if unknown:
        raise ConfigError(unknown[0], "unknown section (expected [server], [prices], [autoscale], [http], [webhooks], [models.NAME], [faults])")
    server = _parse_server(data.get("server", {}))
    models_raw = data.get("models", {})
    _type("models", models_raw, dict, "a table of models")
    if not models_raw:
        raise ConfigError("models", "at least one model is required")
    models = {name: _parse_model(name, raw) for name, raw in models_raw.items()}
    for name, m in models.items():
        key = f"models.{name}.fallback"
        if m.fallback is None:
            continue
        if m.fallback == name:
            raise ConfigError(key, "a model cannot be its own fallback")
        if m.fallback not in models:
            raise ConfigError(key, f"unknown model {m.fallback!r}")
        if models[m.fallback].kind != m.kind:
            raise ConfigError(key, f"{m.fallback} is a {models[m.fallback].kind} model; {name} is {m.kind}")
    faults = _parse_faults(data["faults"], models) if "faults" in data else None
    autoscale = _parse_autoscale(data["autoscale"]) if "autoscale" in data else None
    http, webhooks = parse_net_sections(data, ConfigError)
    return Config(server, models, _parse_prices(data.get("prices", {})), faults, autoscale, http, webhooks)


def _parse_autoscale(raw: Any) -> AutoscaleConfig:
    from .engine.autoscale import POLICIES

    _check_table("autoscale", raw, set(AutoscaleConfig.__dataclass_fields__) - {"params"} | set(AUTOSCALE_PARAMS))
    kw: dict[str, Any] = {}
    if "policy" in raw:
        kw["policy"] = _type("autoscale.policy", raw["policy"], str, "a string")
        if kw["policy"] not in POLICIES:
            raise ConfigError("autoscale.policy", f"unknown policy {kw['policy']!r}; one of {', '.join(POLICIES)}")
    for k in ("min_devices", "max_devices"):
        if k in raw:
            kw[k] = _int(f"autoscale.{k}", raw[k], 0)
    for k in ("budget_per_hour", "price_per_hour", "scale_down_delay_s"):
        if k in raw:
            kw[k] = _float(f"autoscale.{k}", raw[k], 0.0)
    if "interval_s" in raw:
        kw["interval_s"] = _float("autoscale.interval_s", raw["interval_s"], 0.05)
    kw["params"] = {k: _float(f"autoscale.{k}", raw[k], 0.0) for k in AUTOSCALE_PARAMS if k in raw}
    a = AutoscaleConfig(**kw)
    if a.max_devices < max(1, a.min_devices):
        raise ConfigError("autoscale.max_devices", f"must be ≥ min_devices ({a.min_devices}) and ≥ 1")
    return a


def model_limits(config: Config) -> dict[str, ModelLimits]:
    return {name: m.limits(config.server) for name, m in config.models.items()}


def engine_settings(config: Config, *, batch_id_prefix: str = "b") -> EngineSettings:
    """The engine's settings from ``[server]``, ``[models.*]`` and ``[autoscale]`` — through the
    same builder the simulator uses for a scenario's ``[engine]``."""
    s = config.server
    return build_engine_settings(
        model_limits(config), {k: getattr(s, k) for k in ENGINE_KEYS},
        fallbacks={name: m.fallback for name, m in config.models.items() if m.fallback},
        liveness=Liveness(s.hang_timeout_s, s.heartbeat_timeout_s, s.stop_grace_s),
        autoscaler=autoscaler(config), batch_id_prefix=batch_id_prefix)


def autoscaler(config: Config) -> Autoscaler | None:
    a = config.autoscale
    if a is None:
        return None
    price = a.price_per_hour if a.price_per_hour is not None else config.prices.get("cpu", 0.0)
    limits = ScaleLimits(a.min_devices, a.max_devices, price, a.budget_per_hour, a.scale_down_delay_s, a.interval_s)
    return Autoscaler(a.policy, limits, **a.params)


def load_config(path: str | Path | None) -> Config:
    """Read ``path``; with no path, the built-in demo catalog."""
    if path is None:
        return parse_config(tomllib.loads(DEMO_TOML))
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read config file: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"invalid TOML: {e}") from None
    return parse_config(data)
