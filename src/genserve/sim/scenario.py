"""Simulation scenarios (TOML), validated at the edge like genserve.toml: errors name their key."""
from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.load import ConfigError
from ..engine.policies.autoscale import POLICIES, Autoscaler, ScaleLimits
from ..engine.policies.placement import PLACEMENT
from ..engine.policies.residency import RESIDENCY
from ..engine.settings import ENGINE_KEYS, EngineSettings, engine_settings
from ..engine.types import ModelLimits

GIB = 1 << 30


@dataclass(frozen=True)
class SimModel:
    name: str
    kind: str
    weights_gb: float
    working_gb: float  # one job at the reference shape
    t1_s: float  # a batch of 1 at the reference shape
    batch_curve: tuple[tuple[int, float], ...]  # (B, f(B)), f(1) = 1
    load_disk_s: float
    load_host_s: float
    ref_pixels: int  # width × height × max(frames, 1) × steps of the reference shape
    limits: ModelLimits
    fallback: str | None = None  # retried on this model after repeated failures (as in genserve.toml)
    ref_steps: int = 20
    # Each job's cost that does not grow with steps or share a batch (prompt encoding, latent set-up,
    # decode, output encoding), at the reference size; t1_s includes it and f(B) is then the curve
    # of the denoising steps alone. 0: the whole batch follows f(B).
    job_overhead_s: float = 0.0

    def f(self, b: int) -> float:
        """The batch curve, linearly interpolated (and extrapolated from the last two points)."""
        pts = self.batch_curve
        if b <= pts[0][0]:
            return pts[0][1]
        for (b0, f0), (b1, f1) in zip(pts, pts[1:]):
            if b <= b1:
                return f0 + (f1 - f0) * (b - b0) / (b1 - b0)
        (b0, f0), (b1, f1) = pts[-2] if len(pts) > 1 else (0, 0.0), pts[-1]
        return f1 + (f1 - f0) / max(1, b1 - b0) * (b - b1)

    def job_seconds(self, pixels: int) -> float:
        """One job's fixed cost at ``pixels`` (width × height × frames)."""
        return self.job_overhead_s * pixels * self.ref_steps / self.ref_pixels

    def step_seconds(self, b: int, pixels: int) -> float:
        """One denoising step over b jobs of ``pixels`` each."""
        return (self.t1_s - self.job_overhead_s) * self.f(b) * pixels / self.ref_pixels

    def batch_seconds(self, b: int, pixels: int, steps: int) -> float:
        """A request-level batch: every job's fixed cost, then ``steps`` steps over all b."""
        return b * self.job_seconds(pixels) + steps * self.step_seconds(b, pixels)

    def working_bytes(self, b: int, units: int) -> int:
        return int(self.working_gb * GIB * b * units / self.ref_pixels)


@dataclass(frozen=True)
class MixEntry:
    model: str
    weight: float
    width: int
    height: int
    num_frames: int
    steps: int
    priority: str
    tenant: str | None = None  # fair share inside the model's queue (None: outside it)


@dataclass(frozen=True)
class Burst:
    at_s: float
    count: int
    over_s: float
    entry: MixEntry


@dataclass(frozen=True)
class Workload:
    kind: str  # poisson | trace
    rate_per_s: float
    profile: str  # flat | diurnal | weekly
    peak_multiplier: float
    peak_hour: float
    mix: tuple[MixEntry, ...]
    bursts: tuple[Burst, ...]
    trace: Path | None
    max_requests: int | None


@dataclass(frozen=True)
class Fleet:
    device_type: str
    initial: int
    provisioning_s: float
    memory_gb: float
    price_per_hour: float
    crash_rate_per_hour: float
    autoscale: dict[str, Any] | None  # policy + params + limits


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    duration_s: float
    slo_s: float
    fleet: Fleet
    models: dict[str, SimModel]
    workload: Workload
    engine: dict[str, Any]
    compare: tuple[tuple[str, dict[str, Any]], ...] = field(default_factory=tuple)
    raw: dict[str, Any] = field(default_factory=dict)
    base: Path = Path(".")
    tenants: dict[str, float] = field(default_factory=dict)  # [tenants.NAME] weight (default 1)

    def engine_settings(self) -> EngineSettings:
        """The same settings object the server builds from genserve.toml."""
        limits = self.scale_limits()
        auto = None
        if limits is not None:
            a = self.fleet.autoscale or {}
            params = {k: v for k, v in a.items() if k not in
                      ("policy", "min_devices", "max_devices", "budget_per_hour", "scale_down_delay_s", "interval_s")}
            auto = Autoscaler(a.get("policy", "queue_depth"), limits, **params)
        return engine_settings({n: m.limits for n, m in self.models.items()}, self.engine,
                               fallbacks={n: m.fallback for n, m in self.models.items() if m.fallback},
                               autoscaler=auto)

    def scale_limits(self) -> ScaleLimits | None:
        a = self.fleet.autoscale
        if a is None:
            return None
        return ScaleLimits(int(a.get("min_devices", 0)), int(a.get("max_devices", 8)), self.fleet.price_per_hour,
                           a.get("budget_per_hour"), float(a.get("scale_down_delay_s", 120.0)),
                           float(a.get("interval_s", 10.0)))


def _num(key: str, v: Any, lo: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(key, f"must be a number, got {v!r}")
    if v < lo:
        raise ConfigError(key, f"must be ≥ {lo}")
    return float(v)


def _int(key: str, v: Any, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"must be an integer, got {v!r}")
    if v < lo:
        raise ConfigError(key, f"must be ≥ {lo}")
    return v


def _get(d: dict, key: str, prefix: str, default: Any = ..., kind=None, lo=0):
    if key not in d:
        if default is ...:
            raise ConfigError(f"{prefix}.{key}", "is required")
        return default
    v = d[key]
    if kind is int:
        return _int(f"{prefix}.{key}", v, lo)
    if kind is float:
        return _num(f"{prefix}.{key}", v, lo)
    if kind is str and not isinstance(v, str):
        raise ConfigError(f"{prefix}.{key}", f"must be a string, got {v!r}")
    return v


def _model(name: str, raw: dict) -> SimModel:
    p = f"models.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(p, "must be a table")
    curve_raw = _get(raw, "batch_curve", p, {"1": 1.0})
    if not isinstance(curve_raw, dict):
        raise ConfigError(f"{p}.batch_curve", 'must be a table like {1 = 1.0, 4 = 1.3}')
    curve = []
    for k, v in curve_raw.items():
        if not str(k).isdigit() or int(k) < 1:
            raise ConfigError(f"{p}.batch_curve.{k}", "keys are batch sizes ≥ 1")
        curve.append((int(k), _num(f"{p}.batch_curve.{k}", v, 0.0)))
    curve.sort()
    if curve[0] != (1, 1.0) and curve[0][0] == 1:
        curve[0] = (1, 1.0)
    elif curve[0][0] != 1:
        curve.insert(0, (1, 1.0))
    ref_w = _get(raw, "ref_width", p, 1024, int, 1)
    ref_h = _get(raw, "ref_height", p, 1024, int, 1)
    ref_f = _get(raw, "ref_frames", p, 0, int, 0)
    ref_steps = _get(raw, "ref_steps", p, 20, int, 1)
    idle = raw.get("idle_unload_s", 120.0)
    batching = _get(raw, "batching", p, "request", str)
    if batching not in ("request", "step"):
        raise ConfigError(f"{p}.batching", "must be request or step")
    step = batching == "step"
    t1 = _get(raw, "t1_s", p, ..., float)
    overhead = _get(raw, "job_overhead_s", p, 0.0, float)
    if overhead >= t1 > 0:
        raise ConfigError(f"{p}.job_overhead_s", f"must be less than t1_s ({t1}), which includes it")
    limits = ModelLimits(
        _get(raw, "max_batch_size", p, 4, int, 1), 0.0 if step else _get(raw, "max_wait_ms", p, 0, int, 0) / 1000.0,
        _get(raw, "max_queue", p, 100_000, int, 1), memory_bytes=int(_get(raw, "weights_gb", p, 10.0, float) * GIB),
        min_warm=_get(raw, "min_warm", p, 0, int, 0), keep_warm_s=_get(raw, "keep_warm_s", p, 0.0, float),
        idle_unload_s=None if idle == "never" else _num(f"{p}.idle_unload_s", idle),
        est_job_seconds=_get(raw, "t1_s", p, 1.0, float), est_load_seconds=_get(raw, "load_disk_s", p, 10.0, float),
        step_batching=step,
    )
    return SimModel(name, _get(raw, "kind", p, "image", str), _get(raw, "weights_gb", p, 10.0, float),
                    _get(raw, "working_gb", p, 1.0, float), t1, tuple(curve),
                    _get(raw, "load_disk_s", p, 10.0, float), _get(raw, "load_host_s", p, 2.0, float),
                    ref_w * ref_h * max(ref_f, 1) * ref_steps, limits, raw.get("fallback"), ref_steps, overhead)


def _entry(p: str, raw: dict, models: dict[str, SimModel]) -> MixEntry:
    model = _get(raw, "model", p, ..., str)
    if model not in models:
        raise ConfigError(f"{p}.model", f"unknown model {model!r}")
    pr = _get(raw, "priority", p, "standard", str)
    if pr not in ("high", "standard", "low"):
        raise ConfigError(f"{p}.priority", "must be high, standard or low")
    return MixEntry(model, _get(raw, "weight", p, 1.0, float), _get(raw, "width", p, 1024, int, 8),
                    _get(raw, "height", p, 1024, int, 8), _get(raw, "num_frames", p, 0, int, 0),
                    _get(raw, "steps", p, 20, int, 1), pr, _get(raw, "tenant", p, None, str))


def _workload(raw: dict, models: dict[str, SimModel], base: Path) -> Workload:
    p = "workload"
    kind = _get(raw, "kind", p, "poisson", str)
    if kind not in ("poisson", "trace"):
        raise ConfigError(f"{p}.kind", "must be poisson or trace")
    profile = _get(raw, "profile", p, "flat", str)
    if profile not in ("flat", "diurnal", "weekly"):
        raise ConfigError(f"{p}.profile", "must be flat, diurnal or weekly")
    mix = tuple(_entry(f"{p}.mix[{i}]", m, models) for i, m in enumerate(raw.get("mix", [])))
    bursts = tuple(Burst(_get(b, "at_s", f"{p}.bursts[{i}]", ..., float), _get(b, "count", f"{p}.bursts[{i}]", ..., int, 1),
                         _get(b, "over_s", f"{p}.bursts[{i}]", 0.0, float), _entry(f"{p}.bursts[{i}]", b, models))
                   for i, b in enumerate(raw.get("bursts", [])))
    trace = raw.get("trace")
    if kind == "trace" and not trace:
        raise ConfigError(f"{p}.trace", "is required when kind = \"trace\"")
    if kind == "poisson" and not mix and not bursts:
        raise ConfigError(f"{p}.mix", "needs at least one entry (or bursts)")
    return Workload(kind, _get(raw, "rate_per_s", p, 1.0, float), profile, _get(raw, "peak_multiplier", p, 3.0, float),
                    _get(raw, "peak_hour", p, 19.0, float), mix, bursts, (base / trace) if trace else None,
                    raw.get("max_requests"))


def _engine(raw: Any) -> dict[str, Any]:
    """``[engine]``: the keys genserve.toml's ``[server]`` has for the engine (same names, defaults)."""
    if not isinstance(raw, dict):
        raise ConfigError("engine", "must be a table")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k not in ENGINE_KEYS:
            raise ConfigError(f"engine.{k}", f"unknown key; one of {', '.join(ENGINE_KEYS)}")
        default = ENGINE_KEYS[k]
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"engine.{k}", f"must be true or false, got {v!r}")
            out[k] = v
        elif isinstance(default, int):
            out[k] = _int(f"engine.{k}", v, 1)
        elif isinstance(default, float):
            out[k] = _num(f"engine.{k}", v)
        else:
            out[k] = _get(raw, k, "engine", kind=str)
    for k, table in (("placement", PLACEMENT), ("residency", RESIDENCY)):
        if k in out and out[k] not in table:
            raise ConfigError(f"engine.{k}", f"unknown policy {out[k]!r}; one of {', '.join(table)}")
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_scenario(raw: dict[str, Any], base: Path = Path(".")) -> Scenario:
    sim = raw.get("sim", {})
    fleet_raw = raw.get("fleet", {})
    auto = fleet_raw.get("autoscale")
    if auto is not None:
        pol = auto.get("policy", "queue_depth")
        if pol not in POLICIES:
            raise ConfigError("fleet.autoscale.policy", f"unknown policy {pol!r}; one of {', '.join(POLICIES)}")
        from ..config.load import AUTOSCALE_PARAMS

        known = {"policy", "min_devices", "max_devices", "budget_per_hour", "scale_down_delay_s", "interval_s",
                 *AUTOSCALE_PARAMS}
        unknown = sorted(set(auto) - known)
        if unknown:
            raise ConfigError(f"fleet.autoscale.{unknown[0]}", "unknown key")
    fleet = Fleet(_get(fleet_raw, "device_type", "fleet", "h100", str), _get(fleet_raw, "initial", "fleet", 1, int, 0),
                  _get(fleet_raw, "provisioning_s", "fleet", 60.0, float), _get(fleet_raw, "memory_gb", "fleet", 80.0, float),
                  _get(fleet_raw, "price_per_hour", "fleet", 2.0, float),
                  _get(fleet_raw, "crash_rate_per_hour", "fleet", 0.0, float), auto)
    models_raw = raw.get("models", {})
    if not models_raw:
        raise ConfigError("models", "at least one model is required")
    models = {n: _model(n, m) for n, m in models_raw.items()}
    for n, m in models.items():
        if m.fallback is not None and (m.fallback not in models or m.fallback == n):
            raise ConfigError(f"models.{n}.fallback", f"must name another model, got {m.fallback!r}")
    compare = tuple((c.get("name", f"variant {i + 1}"), {k: v for k, v in c.items() if k != "name"})
                    for i, c in enumerate(raw.get("compare", [])))
    return Scenario(_get(sim, "name", "sim", "scenario", str), _get(sim, "seed", "sim", 1, int, 0),
                    _get(sim, "duration_s", "sim", 3600.0, float), _get(sim, "slo_s", "sim", 60.0, float),
                    fleet, models, _workload(raw.get("workload", {}), models, base), _engine(raw.get("engine", {})),
                    compare, raw, base, _tenants(raw.get("tenants", {})))


def _tenants(raw: Any) -> dict[str, float]:
    """``[tenants.NAME] weight = …``: fair-share weights of the tenants named by workload entries."""
    if not isinstance(raw, dict):
        raise ConfigError("tenants", "must be a table of [tenants.NAME] tables")
    out = {}
    for name, t in raw.items():
        if not isinstance(t, dict) or set(t) - {"weight"}:
            raise ConfigError(f"tenants.{name}", "must be a table with only weight")
        out[name] = _get(t, "weight", f"tenants.{name}", 1.0, float, 1e-9)
    return out


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(str(path), f"cannot read scenario: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"invalid TOML: {e}") from None
    return parse_scenario(raw, path.parent)


def variant(s: Scenario, overrides: dict[str, Any]) -> Scenario:
    raw = deep_merge({k: v for k, v in s.raw.items() if k != "compare"}, overrides)
    return parse_scenario(raw, s.base)
