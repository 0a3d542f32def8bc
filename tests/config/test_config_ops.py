"""Config ergonomics: every error at once with suggestions, GENSERVE_A__B overrides, file discovery,
and the JSON Schema (docs/genserve.schema.json) matching the parser."""
import json
import tomllib
from pathlib import Path

import jsonschema
import pytest

from genserve.config.demo import DEMO_TOML
from genserve.config.env import find_config, overrides, scalar
from genserve.config.errors import ConfigErrors, message_of
from genserve.config.load import SECTIONS, ConfigError, load_config, parse_config
from genserve.config.schema import json_schema

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + "A" * 32


def test_all_errors_at_once_each_naming_its_key():
    with pytest.raises(ConfigErrors) as e:
        parse_config({"server": {"prot": 1, "workers": -1, "aging_s": "x"}, "modles": {},
                      "models": {"a": {"kind": "imgae", "source": "x", "max_batch_siz": 3},
                                 "b": {"kind": "image", "source": "y", "sizes": ["big"], "max_steps": 0}}})
    msgs = {err.key: message_of(err) for err in e.value.errors}
    assert set(msgs) == {"modles", "server.prot", "server.workers", "server.aging_s", "models.a.kind",
                         "models.a.max_batch_siz", "models.b.max_steps", "models.b.sizes[0]"}
    assert "did you mean 'models'" in msgs["modles"]
    assert "did you mean 'port'" in msgs["server.prot"]
    assert "did you mean 'max_batch_size'" in msgs["models.a.max_batch_siz"]
    # One line per error, each starting with its key; the first error is also the exception's key.
    lines = str(e.value).splitlines()
    assert len(lines) == len(e.value.errors) and all(ln.split(":")[0] in msgs for ln in lines)
    assert e.value.key == e.value.errors[0].key


def test_single_error_is_a_plain_config_error_and_no_suggestion_for_nonsense():
    with pytest.raises(ConfigError) as e:
        parse_config({"models": {"m": {"kind": "image", "source": "x", "zzzqqq": 1}}})
    assert not isinstance(e.value, ConfigErrors)
    assert str(e.value) == "models.m.zzzqqq: unknown key"


def test_env_overrides_any_key_parsed_as_toml(tmp_path):
    p = tmp_path / "g.toml"
    p.write_text('[models.demo-image]\nkind = "image"\nsource = "demo:image"\n')
    env = {"GENSERVE_SERVER__PORT": "9001", "GENSERVE_SERVER__WEBHOOK_SECRET": SECRET,
           "GENSERVE_SERVER__PRELOAD": "true", "GENSERVE_MODELS__DEMO_IMAGE__MAX_BATCH_SIZE": "6",
           "GENSERVE_MODELS__DEMO_IMAGE__SIZES": '["64x64", "128x128"]', "GENSERVE_PRICES__CPU": "0.5",
           "GENSERVE_CONFIG": "ignored", "GENSERVE_URL": "ignored too"}
    c = load_config(p, env)
    assert c.server.port == 9001 and c.server.webhook_secret == SECRET and c.server.preload is True
    m = c.models["demo-image"]
    assert m.max_batch_size == 6 and m.sizes == ((64, 64), (128, 128)) and c.prices["cpu"] == 0.5
    assert scalar("8000") == 8000 and scalar("1.5") == 1.5 and scalar("abc") == "abc" and scalar('"8"') == "8"
    assert [o[2] for o in overrides(env)] == sorted(k for k in env if "__" in k)


def test_env_override_errors_name_the_variable():
    with pytest.raises(ConfigErrors) as e:
        load_config(None, {"GENSERVE_SERVER__PORT": "http", "GENSERVE_SERVER__WORKRES": "2"})
    msgs = {err.key: message_of(err) for err in e.value.errors}
    assert msgs["server.port"].endswith("(from $GENSERVE_SERVER__PORT)")
    assert "did you mean 'workers'" in msgs["server.workres"] and "$GENSERVE_SERVER__WORKRES" in msgs["server.workres"]


def test_discovery_order(tmp_path):
    other = tmp_path / "other.toml"
    assert find_config("x.toml", tmp_path, {}) == Path("x.toml")
    assert find_config(None, tmp_path, {}) is None
    assert find_config(None, tmp_path, {"GENSERVE_CONFIG": str(other)}) == other
    (tmp_path / "genserve.toml").write_text("")
    assert find_config(None, tmp_path, {"GENSERVE_CONFIG": str(other)}) == tmp_path / "genserve.toml"


def _schema():
    return json_schema(SECTIONS)


def test_shipped_schema_is_the_generated_one():
    shipped = json.loads((ROOT / "docs" / "genserve.schema.json").read_text())
    assert shipped == json.loads(json.dumps(_schema())), "regenerate: genserve config schema > docs/genserve.schema.json"


def test_schema_keys_match_the_parser():
    props = _schema()["properties"]
    assert set(props) == set(SECTIONS)
    for name, sec in SECTIONS.items():
        table = props[name]["additionalProperties"] if sec.keyed else props[name]
        if sec.open:
            continue
        assert set(table["properties"]) == sec.known_keys(), name
        # Every key the schema knows, the parser accepts (no "unknown key" error for it).
        for key in table["properties"]:
            raw = {"models": {"m": {"kind": "image", "source": "x"}}}
            target = raw["models"]["m"] if name == "models" else raw.setdefault(name, {})
            target[key] = object()  # a value no parser accepts: the error must be about the value
            try:
                parse_config(raw)
            except ConfigError as e:
                errs = e.errors if isinstance(e, ConfigErrors) else [e]
                assert not any("unknown key" in message_of(x) for x in errs), (name, key, str(e))


def test_examples_validate_and_bad_ones_do_not():
    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    examples = [tomllib.loads(DEMO_TOML)]
    for p in [*ROOT.glob("docs/**/*.toml"), *ROOT.glob("deploy/**/*.toml")]:
        examples.append(tomllib.loads(p.read_text()))
    examples.append({"server": {"port": 8000, "idle_unload_s": "never", "webhook_secret": SECRET},
                     "autoscale": {"policy": "queue_depth", "target_queue_s": 5},
                     "prices": {"H100": 2.5}, "models": {"m": {"kind": "image", "source": "x", "sizes": ["64x64"]}}})
    for ex in examples:
        parse_config({k: v for k, v in ex.items() if k != "faults"})  # the parser agrees they are valid
        assert not list(v.iter_errors(ex)), ex
    for bad in ({"server": {"prot": 1}}, {"modles": {}}, {"models": {"m": {"kind": "audio", "source": "x"}}},
                {"models": {"m": {"kind": "image", "source": "x", "sizes": ["big"]}}}, {"server": {"port": "80"}}):
        assert list(v.iter_errors(bad)), bad


def test_a_misspelt_key_gets_a_suggestion_in_every_section():
    """Every fixed table (not the open ones, nor [faults], refused as a whole outside tests) answers
    a slip of two letters with "did you mean"."""
    for name, sec in SECTIONS.items():
        if sec.open or name == "faults":
            continue
        for key in sorted(k for k in sec.known_keys() if len(k) >= 6):
            typo = key[:-2] + key[-1] + key[-2]  # last two letters swapped: "results_dasy"
            if typo in sec.known_keys():
                continue
            raw = {"models": {"m": {"kind": "image", "source": "x"}}}
            if sec.keyed:  # [models.m], [tenants.m]
                target, prefix = raw.setdefault(name, {}).setdefault("m", {}), f"{name}.m"
            else:
                target, prefix = raw.setdefault(name, {}), name
            target[typo] = 1
            with pytest.raises(ConfigError) as e:
                parse_config(raw)
            errs = {x.key: message_of(x) for x in (e.value.errors if isinstance(e.value, ConfigErrors) else [e.value])}
            assert f"did you mean {key!r}" in errs.get(f"{prefix}.{typo}", ""), (name, key, errs)
