import pytest

from genserve.config.load import ConfigError, load_config, parse_config


def base(**model):
    m = {"kind": "image", "source": "/models/x", **model}
    return {"models": {"m": m}}


def test_demo_catalog_is_valid():
    cfg = load_config(None)
    assert set(cfg.models) == {"demo-image", "demo-video", "demo-i2v"}
    assert cfg.models["demo-video"].kind == "video" and cfg.models["demo-video"].max_frames >= 9


@pytest.mark.parametrize("model, key", [
    ({"max_batch_size": 0}, "models.m.max_batch_size"),
    ({"max_batch_size": "4"}, "models.m.max_batch_size"),
    ({"kind": "audio"}, "models.m.kind"),
    ({"dtype": "int4"}, "models.m.dtype"),
    ({"sizes": ["64x63"]}, "models.m.sizes[0]"),
    ({"sizes": ["big"]}, "models.m.sizes[0]"),
    ({"default_steps": 50, "max_steps": 10}, "models.m.default_steps"),
    ({"max_frames": 8}, "models.m.max_frames"),
    ({"colour": "red"}, "models.m.colour"),
    ({"source": "demo:audio"}, "models.m.source"),
    ({"max_wait_ms": -1}, "models.m.max_wait_ms"),
])
def test_invalid_model_keys_are_named(model, key):
    with pytest.raises(ConfigError) as e:
        parse_config(base(**model))
    assert e.value.key == key
    assert str(e.value).startswith(key + ":")


def test_video_model_needs_frames():
    with pytest.raises(ConfigError) as e:
        parse_config(base(kind="video"))
    assert e.value.key == "models.m.max_frames"


def test_server_keys_and_missing_models(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config({"server": {"port": 70000}, **base()})
    assert e.value.key == "server.port"
    for bad in ({"header_timeout_s": 0}, {"max_connections": 0}, {"max_connections": "many"}, {"worker_threads": 0},
                {"worker_threads": 1.5}):
        with pytest.raises(ConfigError) as e:
            parse_config({"server": bad, **base()})
        assert e.value.key == "server." + next(iter(bad))
    s = parse_config({"server": {"header_timeout_s": 2.5, "max_connections": 64}, **base()}).server
    assert (s.header_timeout_s, s.max_connections) == (2.5, 64)
    assert parse_config({"server": {"worker_threads": 2}, **base()}).server.worker_threads == 2
    assert parse_config(base()).server.worker_threads is None  # each worker's share of the CPUs
    assert (parse_config(base()).server.header_timeout_s, parse_config(base()).server.max_connections) == (10.0, 1000)
    with pytest.raises(ConfigError) as e:
        parse_config({"server": {"workers": 1}})
    assert e.value.key == "models"
    bad = tmp_path / "bad.toml"
    bad.write_text("[models.x\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_file_round_trip_and_overrides(tmp_path):
    p = tmp_path / "genserve.toml"
    p.write_text('[server]\nport = 9000\nworkers = 2\n[models.sd]\nkind = "image"\nsource = "org/model"\n'
                 'sizes = ["512x512", "768x512"]\nmax_wait_ms = 100\n')
    cfg = load_config(p).with_overrides(port=9100, data_dir=str(tmp_path / "d"))
    assert cfg.server.port == 9100 and cfg.server.workers == 2 and cfg.server.data_dir == tmp_path / "d"
    sd = cfg.models["sd"]
    assert sd.default_size == (512, 512) and sd.limits(cfg.server).max_wait_s == 0.1
    assert cfg.model_dir("sd").name == "model"


def test_prices_defaults_overrides_and_errors():
    cfg = parse_config(base())
    assert cfg.prices["H100"] == 2.00 and cfg.prices["H200"] == 2.60 and cfg.prices["B200"] == 4.00
    cfg = parse_config({**base(), "prices": {"cpu": 0.5, "MI300X": 3}})
    assert cfg.prices["cpu"] == 0.5 and cfg.prices["MI300X"] == 3.0 and cfg.prices["H100"] == 2.00
    for bad, key in (({"H100": "two"}, "prices.H100"), ({"cpu": -1}, "prices.cpu"), ("cheap", "prices")):
        with pytest.raises(ConfigError) as e:
            parse_config({**base(), "prices": bad})
        assert e.value.key == key


@pytest.mark.parametrize("models, key, msg", [
    ({"a": {"fallback": "a"}}, "models.a.fallback", "its own fallback"),
    ({"a": {"fallback": "nope"}}, "models.a.fallback", "unknown model"),
    ({"a": {"fallback": "v"}, "v": {"kind": "video", "max_frames": 9, "default_frames": 9}}, "models.a.fallback",
     "video model"),
    ({"a": {"timeout_s": 0}}, "models.a.timeout_s", "≥"),
])
def test_fallback_and_timeout_are_validated(models, key, msg):
    raw = {"models": {n: {"kind": "image", "source": "/m", **m} for n, m in models.items()}}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert e.value.key == key and msg in str(e.value)


@pytest.mark.parametrize("server, key", [
    ({"webhook_secret": "not-a-secret"}, "server.webhook_secret"),
    ({"webhook_secret": "whsec_c2hvcnQ="}, "server.webhook_secret"),
    ({"max_attempts": 0}, "server.max_attempts"),
    ({"heartbeat_s": 5, "heartbeat_timeout_s": 5}, "server.heartbeat_timeout_s"),
    ({"stop_grace_s": -1}, "server.stop_grace_s"),
])
def test_failure_settings_are_validated(server, key):
    with pytest.raises(ConfigError) as e:
        parse_config({"server": server, **base()})
    assert e.value.key == key


def test_faults_are_refused_unless_enabled_by_environment(monkeypatch):
    raw = {**base(), "faults": {"crash_on_batch": 2}}
    monkeypatch.delenv("GENSERVE_ENABLE_FAULTS", raising=False)
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert e.value.key == "faults"
    monkeypatch.setenv("GENSERVE_ENABLE_FAULTS", "1")
    faults = parse_config({**raw, "faults": {"crash_on_batch": 2, "workers": ["w1"]}}).faults
    assert faults.for_worker("w0", 0) is None and faults.for_worker("w1", 0)["crash_on_batch"] == 2
    assert faults.for_worker("w1", 1) is None  # restarted processes behave (lives = 1)
    with pytest.raises(ConfigError) as e:
        parse_config({**raw, "faults": {"fail_load": ["nope"]}})
    assert e.value.key == "faults.fail_load[0]"


def test_fallback_and_timeout_parse():
    cfg = parse_config({"models": {"a": {"kind": "image", "source": "/m", "fallback": "b", "timeout_s": 30},
                                   "b": {"kind": "image", "source": "/m"}}})
    assert cfg.models["a"].fallback == "b" and cfg.models["a"].timeout_s == 30.0 and cfg.models["b"].fallback is None


def test_loras_section_and_lora_keys(tmp_path):
    from genserve.config.load import ConfigError, parse_config

    f = tmp_path / "ink.safetensors"
    f.write_bytes(b"")
    c = parse_config({"models": {"m": {"kind": "image", "source": "demo:image", "max_loras": 2,
                                       "lora_batching": "split"}},
                      "server": {"max_lora_bytes": 1000, "lora_memory_mb": 64},
                      "loras": {"ink": {"model": "m", "source": str(f)}}})
    assert c.loras["ink"].model == "m" and c.models["m"].max_loras == 2 and c.models["m"].lora_batching == "split"
    assert c.server.max_lora_bytes == 1000 and c.server.lora_memory_mb == 64
    for raw, key in (({"ink": {"model": "nope", "source": str(f)}}, "loras.ink.model"),
                     ({"ink": {"model": "m", "source": "x.bin"}}, "loras.ink.source"),
                     ({"ink": {"model": "m"}}, "loras.ink.source")):
        with pytest.raises(ConfigError) as e:
            parse_config({"models": {"m": {"kind": "image", "source": "demo:image"}}, "loras": raw})
        assert key in str(e.value)
    with pytest.raises(ConfigError, match="models.m.lora_batching"):
        parse_config({"models": {"m": {"kind": "image", "source": "demo:image", "lora_batching": "fused"}}})
