"""One EngineSettings, built by both drivers: genserve.toml's [server] and a scenario's [engine]."""
from __future__ import annotations

import copy
import tomllib

import pytest

from genserve.config.load import ConfigError, ServerConfig, engine_settings, parse_config
from genserve.engine import Engine, EngineSettings, Liveness
from genserve.engine.settings import ENGINE_KEYS
from genserve.sim.scenario import parse_scenario

from ..sim.test_simulator import TINY

ENGINE = {"aging_s": 7.0, "max_attempts": 5, "retry_backoff_s": 2.0, "retry_backoff_max_s": 9.0,
          "fallback_after": 1, "saturation": 0.5, "preload": True, "preload_min_probability": 0.4}


def _server_config(extra: dict) -> EngineSettings:
    server = "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in extra.items())
    cfg = parse_config(tomllib.loads(f"""
[server]
{server}
[models.img]
kind = "image"
source = "/m/img"
fallback = "vid"
[models.vid]
kind = "image"
source = "/m/vid"
"""))
    return engine_settings(cfg)


def _scenario(extra: dict) -> EngineSettings:
    raw = copy.deepcopy(TINY)
    raw["engine"] = dict(extra)
    raw["models"]["img"]["fallback"] = "vid"
    return parse_scenario(raw).engine_settings()


def test_server_defaults_are_the_engine_defaults():
    s = ServerConfig()
    assert {k: getattr(s, k) for k in ENGINE_KEYS} == ENGINE_KEYS


def test_config_and_scenario_build_the_same_engine_settings():
    a, b = _server_config(ENGINE), _scenario(ENGINE)
    for field in ("aging_s", "retry", "saturation", "preload", "preload_min_probability", "placement", "residency"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.retry.max_attempts == 5 and a.retry.backoff.base_s == 2.0 and a.retry.backoff.max_s == 9.0
    assert a.retry.fallbacks == {"img": "vid"} and a.retry.fallback_after == 1
    # Only the server hears heartbeats: liveness is on there, off in the simulator.
    assert a.liveness.heartbeat_timeout_s is not None and b.liveness == Liveness.OFF
    assert isinstance(Engine(a).settings, EngineSettings) and Engine(b).failures.retry.max_attempts == 5


@pytest.mark.parametrize("engine,key", [
    ({"max_atempts": 3}, "engine.max_atempts"),
    ({"placement": "random"}, "engine.placement"),
    ({"preload": 1}, "engine.preload"),
    ({"aging_s": -1}, "engine.aging_s"),
])
def test_scenario_engine_keys_are_validated(engine, key):
    with pytest.raises(ConfigError) as e:
        _scenario(engine)
    assert e.value.key == key


def test_a_scenario_fallback_must_name_another_model():
    raw = copy.deepcopy(TINY)
    raw["models"]["img"]["fallback"] = "nope"
    with pytest.raises(ConfigError) as e:
        parse_scenario(raw)
    assert e.value.key == "models.img.fallback"
