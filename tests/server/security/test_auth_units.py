"""The key store, the token bucket and the [auth]/[tenants] parser (no server)."""
import sqlite3
import tomllib

import pytest

from genserve.config.auth import TenantConfig
from genserve.config.load import ConfigError, parse_config
from genserve.server.security.keys import KeyStore, hash_key
from genserve.server.security.rate import RateLimiter

BASE = """
[models.img]
kind = "image"
source = "/nowhere"
"""


def parse(extra: str):
    return parse_config(tomllib.loads(BASE + extra))


def test_keys_are_stored_hashed_and_verified_across_connections(tmp_path):
    server, cli = KeyStore(tmp_path), KeyStore(tmp_path)
    assert not server.any_keys()
    key_id, key = cli.create("acme", "admin", name="ci")
    rows = sqlite3.connect(tmp_path / "keys.db").execute("SELECT hash, tenant, scope FROM api_keys").fetchall()
    assert rows == [(hash_key(key), "acme", "admin")]  # the key itself is nowhere
    p = server.verify(key)  # another connection: seen through data_version, no restart
    assert p is not None and (p.tenant, p.scope, p.key_id, p.admin) == ("acme", "admin", key_id, True)
    assert server.verify(key[:-1]) is None and server.verify("") is None and server.verify("Bearer " + key) is None
    assert cli.revoke(key_id) and not cli.revoke(key_id)
    assert server.verify(key) is None and server.any_keys()
    with pytest.raises(ValueError, match="tenant"):
        cli.create("no spaces allowed")
    with pytest.raises(ValueError, match="scope"):
        cli.create("acme", "root")
    assert len({cli.create("t")[1] for _ in range(20)}) == 20
    server.close(), cli.close()


def test_token_bucket():
    cfg = TenantConfig(rate_per_s=2.0, burst=3)
    rl = RateLimiter()
    assert [rl.take("a", cfg, 1, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("a", cfg, 1, 0.0) == pytest.approx(0.5)  # refused: nothing taken
    assert rl.take("b", cfg, 1, 0.0) == 0.0  # buckets are per tenant
    assert rl.take("a", cfg, 1, 0.5) == 0.0
    assert rl.take("a", cfg, 2, 10.0) == 0.0  # refilled, capped at the burst
    assert rl.take("a", cfg, 2, 10.0) == pytest.approx(0.5)
    assert rl.take("a", cfg, 4, 100.0) == float("inf")  # more than the burst: never at once
    assert RateLimiter().take("a", TenantConfig(), 1000, 0.0) == 0.0  # no rate: no limit


def test_tenant_and_auth_settings():
    c = parse('[auth]\nrequired = true\nmetrics_token = "0123456789abcdef"\n'
              '[tenants.acme]\nmax_queued = 5\nrate_per_s = 1.5\nburst = 3\nmax_priority = "standard"\nweight = 2\n'
              '[server]\ncors_origins = ["https://app.example.com", "http://localhost:3000"]\nfair_share = false\n')
    assert c.access.auth.required and c.access.auth.metrics_token == "0123456789abcdef"
    t = c.access.tenant("acme")
    assert (t.max_queued, t.rate_per_s, t.burst, t.max_priority, t.weight) == (5, 1.5, 3, "standard", 2.0)
    assert not t.priority_allowed("high") and t.priority_allowed("standard") and t.priority_allowed("low")
    assert c.access.tenant("unknown") == TenantConfig()
    assert (c.access.metric_label("acme"), c.access.metric_label("zzz")) == ("acme", "other")
    assert c.server.cors_origins == ("https://app.example.com", "http://localhost:3000")
    assert c.server.fair_share is False
    assert parse("").access.tenants == {} and not parse("").access.auth.required


@pytest.mark.parametrize("extra, key", [
    ("[auth]\nrequired = 1\n", "auth.required"),
    ("[auth]\nmetrics_token = \"short\"\n", "auth.metrics_token"),
    ("[auth]\nusers = 1\n", "auth.users"),
    ("[tenants.acme]\nmax_queued = 0\n", "tenants.acme.max_queued"),
    ("[tenants.acme]\nmax_queued = \"5\"\n", "tenants.acme.max_queued"),
    ("[tenants.acme]\nrate_per_s = 0\n", "tenants.acme.rate_per_s"),
    ("[tenants.acme]\nburst = 3\n", "tenants.acme.burst"),
    ("[tenants.acme]\nweight = true\n", "tenants.acme.weight"),
    ("[tenants.acme]\nmax_priority = \"urgent\"\n", "tenants.acme.max_priority"),
    ("[tenants.acme]\ncolour = 1\n", "tenants.acme.colour"),
    ("[tenants.\"bad name\"]\n", "tenants.bad name"),
    ("[server]\ncors_origins = \"*\"\n", "server.cors_origins"),
    ("[server]\ncors_origins = [\"https://a.example/path\"]\n", "server.cors_origins[0]"),
    ("[server]\nfair_share = 1\n", "server.fair_share"),
])
def test_bad_settings_name_their_key(extra, key):
    with pytest.raises(ConfigError) as e:
        parse(extra)
    assert e.value.key == key
