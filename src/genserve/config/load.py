"""genserve.toml: server settings and the model catalog, validated at the edge.

Every error names the offending key (``models.demo-image.max_batch_size: …``) and is raised before
anything starts. Past this module the rest of the code trusts its inputs.
"""
from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..engine.policies.autoscale import POLICIES, Autoscaler, ScaleLimits
from ..engine.policies.liveness import Liveness
from ..engine.policies.placement import PLACEMENT
from ..engine.policies.residency import RESIDENCY
from ..engine.settings import ENGINE_KEYS, EngineSettings, engine_settings as build_engine_settings
from ..engine.types import ModelLimits
from . import env as config_env  # (a load_config parameter is called env)
from . import families
from .auth import AccessConfig, AuthConfig, TenantConfig, parse_access, parse_cors_origins
from .cluster import ClusterConfig, ResultsConfig, StoreConfig, parse_cluster, parse_results, parse_store
from .demo import DEMO_SOURCES, DEMO_TOML
from .errors import Collector, ConfigError, unknown_key
from .faults import FAULTS_ENV, FaultConfig, parse_faults  # noqa: F401 (FAULTS_ENV: re-exported)
from .network import HttpConfig, WebhookPolicy, parse_net_sections
from .retention import RetentionConfig, RetentionError, parse_retention
from .schema import NEVER, SIZE, Section
from .values import _check_table, _float, _int, _seconds_or_never, _secret, _size, _type, parse_size  # noqa: F401 (parse_size: re-exported)

KINDS = ("image", "video")
DTYPES = ("auto", "float32", "float16", "bfloat16")
BATCHING_MODES = ("request", "step")
GIB = 1 << 30


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
    batching: str = "request"  # "step": requests join and leave a running set at step boundaries
    max_loras: int = 4  # LoRA adapters one job may ask for (docs/lora.md)
    lora_batching: str = "mixed"  # "split": the adapter set joins the batch key
    # The model family's traits (read from its files) and keys (true_cfg_scale, max_sequence_length).
    family: families.ModelFamily = families.ModelFamily()

    def limits(self, server: "ServerConfig") -> ModelLimits:
        idle = self.idle_unload_s if self.idle_unload_s is not None else server.idle_unload_s
        step = self.batching == "step"
        # Step mode needs no batching window: a job starts at once and later arrivals join it.
        return ModelLimits(self.max_batch_size, 0.0 if step else self.max_wait_ms / 1000.0, self.max_queue,
                           memory_bytes=int(self.memory_gb * GIB), min_warm=self.min_warm,
                           keep_warm_s=self.keep_warm_s, idle_unload_s=None if idle < 0 else idle,
                           step_batching=step)

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
            "fallback": self.fallback, "timeout_s": self.timeout_s, "batching": self.batching, **self.family.public(),
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
    fair_share: bool = True  # across tenants inside a model's queue (engine/queues.py)
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
    drain_s: float = 25.0  # on SIGTERM: how long running batches may finish before they are requeued
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (docs/security.md)
    # The bare server's connection guards (server/http/serve.py, docs/operations.md).
    header_timeout_s: float = 10.0  # a connection whose request headers are not complete by then is closed
    max_connections: int = 1000  # open connections beyond this: requests get 503 (/healthz still answers)
    # Threads of torch and every OpenMP/MKL/BLAS pool in each worker, set before torch is imported
    # (workers/process.py). None: the worker's share of the CPUs (local: cpu_count // workers; a Ray
    # actor: its cpus_per_worker), at least 1.
    worker_threads: int | None = None
    max_lora_bytes: int = 256 << 20  # the largest adapter file accepted (docs/lora.md)
    lora_memory_mb: float = 1024.0  # adapters each worker keeps resident (LRU beyond this)


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
class Config:
    server: ServerConfig
    models: dict[str, ModelConfig] = field(default_factory=dict)
    prices: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    faults: FaultConfig | None = None
    autoscale: AutoscaleConfig | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    access: AccessConfig = AccessConfig()  # [auth], [tenants.*] (genserve/config/auth.py)
    http: HttpConfig = field(default_factory=HttpConfig)  # [http]: body limit, public URL (config/network.py)
    webhooks: WebhookPolicy = field(default_factory=WebhookPolicy)  # [webhooks]: SSRF allowlist
    store: StoreConfig = field(default_factory=StoreConfig)  # [store]: SQLite files or one PostgreSQL (docs/ha.md)
    loras: dict[str, families.LoraSource] = field(default_factory=dict)  # [loras.NAME] (docs/lora.md)

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


# The registry of top-level tables: known keys, unknown-section errors and the JSON Schema
# (``genserve config schema``) all come from here. A new section: one entry, its parser, one call
# in ``parse_config`` and one field on ``Config``.
SECTIONS: dict[str, Section] = {
    "server": Section(ServerConfig, title="server settings", overrides={
        "residency": {"enum": sorted(RESIDENCY)}, "placement": {"enum": sorted(PLACEMENT)},
        "idle_unload_s": NEVER, "webhook_secret": {"type": "string", "pattern": "^whsec_"},
        "saturation": {"minimum": 0, "maximum": 1}, "port": {"minimum": 0, "maximum": 65535},
        "header_timeout_s": {"minimum": 0.1}, "max_connections": {"minimum": 1}, "worker_threads": {"minimum": 1}}),
    "models": Section(ModelConfig, keyed=True, exclude=("name", "family"), required=("kind", "source"), title="a model",
                      extra={"true_cfg_scale": {"type": "number", "minimum": 0},
                             "max_sequence_length": {"type": "integer", "minimum": 1, "maximum": 512},
                             **families.SPEED_SCHEMA},
                      overrides={"kind": {"enum": list(KINDS)}, "dtype": {"enum": list(DTYPES)},
                                 "batching": {"enum": list(BATCHING_MODES)},
                                 "lora_batching": {"enum": list(families.LORA_BATCHING)},
                                 "sizes": {"type": "array", "items": SIZE}, "default_size": SIZE,
                                 "idle_unload_s": NEVER, "fallback": {"type": "string"}}),
    "prices": Section(open=True, values={"type": "number", "minimum": 0}, title="US$ per device-hour by device type"),
    "autoscale": Section(AutoscaleConfig, exclude=("params",), title="autoscaling",
                         overrides={"policy": {"enum": sorted(POLICIES)}},
                         extra={k: {"type": "number", "minimum": 0} for k in AUTOSCALE_PARAMS}),
    "faults": Section(FaultConfig, title="fault injection (tests only)"),
    "cluster": Section(ClusterConfig, title="where workers run (docs/cluster.md)",
                       overrides={"provider": {"enum": ["local", "ray"]}}),
    "results": Section(ResultsConfig, title="where outputs are stored (docs/cluster.md)",
                       overrides={"store": {"enum": ["local", "s3"]}, "serve": {"enum": ["redirect", "proxy"]}}),
    "store": Section(StoreConfig, title="where jobs, attempts, deliveries and API keys live (docs/ha.md)",
                     overrides={"backend": {"enum": ["sqlite", "postgres"]}, "pool_size": {"minimum": 1, "maximum": 200}}),
    "retention": Section(RetentionConfig, title="how long results and job records are kept (docs/operations.md)"),
    "auth": Section(AuthConfig, title="API keys (docs/security.md)"),
    "http": Section(HttpConfig, title="request limits and returned URLs (docs/security.md)",
                    overrides={"trusted_proxies": {"type": "array", "items": {"type": "string"}},
                               "public_url": {"type": "string"}, "max_body_bytes": {"type": "integer", "minimum": 1},
                               "max_upload_bytes": {"type": "integer", "minimum": 1}}),
    "webhooks": Section(None, title="which webhook receivers beyond the public internet are allowed (docs/security.md)",
                        extra={"allow_private": {"type": "boolean", "default": False},
                               "allow": {"type": "array", "items": {"type": "string"}}}),
    "tenants": Section(TenantConfig, keyed=True, title="a tenant's limits and fair-share weight (docs/security.md)",
                       overrides={"max_priority": {"enum": ["high", "standard", "low"]}}),
    "loras": Section(families.LoraSource, keyed=True, exclude=("name",), required=families.LORA_KEYS,
                     title="a LoRA adapter registered at start-up (docs/lora.md)"),
}
_MODEL_KEYS = SECTIONS["models"].known_keys()
_SERVER_KEYS = SECTIONS["server"].known_keys()


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
            "max_prompt_chars": 1, "min_warm": 0, "max_loras": 0}
    for k, lo in ints.items():
        if k in raw:
            kw[k] = _int(f"{p}.{k}", raw[k], lo)
    for k in ("default_guidance", "memory_gb", "keep_warm_s"):
        if k in raw:
            kw[k] = _float(f"{p}.{k}", raw[k], 0.0)
    if "idle_unload_s" in raw:
        kw["idle_unload_s"] = _seconds_or_never(f"{p}.idle_unload_s", raw["idle_unload_s"])
    if "timeout_s" in raw:
        kw["timeout_s"] = _float(f"{p}.timeout_s", raw["timeout_s"], 0.1)
    if "fallback" in raw:
        kw["fallback"] = _type(f"{p}.fallback", raw["fallback"], str, "a model name")
    if "batching" in raw:
        kw["batching"] = _type(f"{p}.batching", raw["batching"], str, "a string")
        if kw["batching"] not in BATCHING_MODES:
            raise ConfigError(f"{p}.batching", f"must be one of {', '.join(BATCHING_MODES)}")
    if "lora_batching" in raw:
        kw["lora_batching"] = _type(f"{p}.lora_batching", raw["lora_batching"], str, "a string")
        if kw["lora_batching"] not in families.LORA_BATCHING:
            raise ConfigError(f"{p}.lora_batching", f"must be one of {', '.join(families.LORA_BATCHING)}")
    if "sizes" in raw:
        _type(f"{p}.sizes", raw["sizes"], list, "a list of sizes")
        kw["sizes"] = tuple(_size(f"{p}.sizes[{i}]", s) for i, s in enumerate(raw["sizes"]))
    if "default_size" in raw:
        kw["default_size"] = _size(f"{p}.default_size", raw["default_size"])
    m = families.build(ModelConfig, kw, raw, lambda k, msg: ConfigError(f"{p}.{k}", msg))
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
              "webhook_backoff_s": 0.0, "drain_s": 0.0, "header_timeout_s": 0.1}
    for k, lo in floats.items():
        if k in raw:
            kw[k] = _float(f"server.{k}", raw[k], lo)
    for k in ("max_attempts", "fallback_after", "quarantine_after", "webhook_max_attempts", "max_connections",
              "worker_threads"):
        if k in raw:
            kw[k] = _int(f"server.{k}", raw[k], 1)
    if "cors_origins" in raw:
        kw["cors_origins"] = parse_cors_origins(raw["cors_origins"], ConfigError)
    if "webhook_secret" in raw:
        kw["webhook_secret"] = _secret("server.webhook_secret", raw["webhook_secret"])
    if "max_lora_bytes" in raw:
        kw["max_lora_bytes"] = _int("server.max_lora_bytes", raw["max_lora_bytes"], 1)
    for k in ("worker_memory_gb", "host_cache_gb", "lora_memory_mb"):
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
    for k in ("preload", "fair_share"):
        if k in raw:
            if not isinstance(raw[k], bool):
                raise ConfigError(f"server.{k}", f"must be true or false, got {raw[k]!r}")
            kw[k] = raw[k]
    for k, names in (("residency", RESIDENCY), ("placement", PLACEMENT)):
        if k in raw:
            kw[k] = _type(f"server.{k}", raw[k], str, "a string")
            if kw[k] not in names:
                raise ConfigError(f"server.{k}", f"unknown policy {kw[k]!r}; one of {', '.join(names)}")
    s = ServerConfig(**kw)
    if s.heartbeat_timeout_s <= s.heartbeat_s:
        raise ConfigError("server.heartbeat_timeout_s", f"must exceed heartbeat_s ({s.heartbeat_s:g})")
    return s


def _parse_prices(raw: Any) -> dict[str, float]:
    """``[prices]``: device type -> US$ per hour. Types are matched against the GPU's name
    (``H100`` matches "NVIDIA H100 80GB HBM3"); ``gpu`` is the fallback for an unlisted GPU."""
    _type("prices", raw, dict, "a table of device type = US$ per hour")
    prices = dict(DEFAULT_PRICES)
    for name, v in raw.items():
        prices[name] = _float(f"prices.{name}", v, 0.0)
    return prices


def parse_config(data: dict[str, Any]) -> Config:
    """Every error in ``data`` at once (``ConfigErrors`` when there are several), each naming its key."""
    c = Collector()
    for name in sorted(set(data) - set(SECTIONS)):
        c.add(unknown_key(name, name, SECTIONS, "unknown section (expected "
                          + ", ".join(f"[{n}{'.NAME' if s.keyed else ''}]" for n, s in SECTIONS.items()) + ")"))
    server = c.run("server", _parse_server, data.get("server", {}), ServerConfig())
    models_raw = data.get("models", {})
    models: dict[str, ModelConfig] = {}
    if not isinstance(models_raw, dict) or not models_raw:
        c.add(ConfigError("models", "at least one model is required" if models_raw == {} else "must be a table of models"))
    else:
        for name, raw in models_raw.items():
            if (m := c.run(f"models.{name}", lambda r, name=name: _parse_model(name, r), raw, None)) is not None:
                models[name] = m
        if len(models) == len(models_raw):  # else references to a broken model would be noise
            _check_fallbacks(models, c)
    faults = c.run("faults", lambda r: parse_faults(r, models), data["faults"], None) if "faults" in data else None
    autoscale = c.run("autoscale", _parse_autoscale, data["autoscale"], None) if "autoscale" in data else None
    prices = c.run("prices", _parse_prices, data.get("prices", {}), dict(DEFAULT_PRICES))
    cluster = c.run("cluster", parse_cluster, data.get("cluster", {}), ClusterConfig())
    results = c.run("results", parse_results, data.get("results", {}), ResultsConfig())
    retention = c.run("retention", _retention, data.get("retention", {}), RetentionConfig())
    store = c.run("store", parse_store, data.get("store", {}), StoreConfig())
    access = c.guard(lambda: parse_access(data, ConfigError), AccessConfig())
    http, webhooks = c.guard(lambda: parse_net_sections(data, ConfigError), (HttpConfig(), WebhookPolicy()))
    loras = {name: lora for name, raw in (data.get("loras") or {}).items() if (lora := c.run(
        f"loras.{name}", lambda r, n=name: families.parse_lora(
            n, r, models, lambda k, msg: ConfigError(f"loras.{n}" + (f".{k}" if k else ""), msg)), raw, None))}
    c.check()
    return Config(server, models, prices, faults, autoscale, cluster, results, retention, access, http, webhooks,
                  store, loras)


def _retention(raw: Any) -> RetentionConfig:
    try:
        return parse_retention(raw)
    except RetentionError as e:
        raise ConfigError(e.key, e.message) from None


def _check_fallbacks(models: dict[str, ModelConfig], c: Collector) -> None:
    for name, m in models.items():
        key = f"models.{name}.fallback"
        if m.fallback == name:
            c.add(ConfigError(key, "a model cannot be its own fallback"))
        elif m.fallback is not None and m.fallback not in models:
            c.add(ConfigError(key, f"unknown model {m.fallback!r}"))
        elif m.fallback is not None and models[m.fallback].kind != m.kind:
            c.add(ConfigError(key, f"{m.fallback} is a {models[m.fallback].kind} model; {name} is {m.kind}"))


def _parse_autoscale(raw: Any) -> AutoscaleConfig:
    _check_table("autoscale", raw, SECTIONS["autoscale"].known_keys())
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


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (``None``: the built-in demo catalog), apply ``GENSERVE_A__B`` overrides from
    ``env`` (default: the process environment; see config_env) and validate. Commands pass
    ``config_env.find_config(--config)`` to honour ``./genserve.toml`` and ``$GENSERVE_CONFIG``."""
    if path is None:
        data = tomllib.loads(DEMO_TOML)
    else:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(str(path), f"cannot read config file: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(str(path), f"invalid TOML: {e}") from None
    origin = config_env.apply(data, config_env.overrides(env))
    try:
        return parse_config(data)
    except ConfigError as e:
        raise config_env.blame(e, origin) from None
