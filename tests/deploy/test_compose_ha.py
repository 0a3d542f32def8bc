"""The HA compose variant (deploy/ha/compose.yaml: PostgreSQL + 2 gateways + 2 engines behind
nginx), checked structurally without a container tool: every genserve service's command parses and
loads its settings onto the one database, the roles are what the docs say, the schema is upgraded
before anything starts, and the proxy sends to both gateways unbuffered."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from genserve.cli.main import build_parser
from genserve.config.load import load_config

from .test_deploy import dockerfile, starts

ROOT = Path(__file__).resolve().parents[2]
HA = ROOT / "deploy" / "ha"


def services() -> dict:
    return yaml.safe_load((HA / "compose.yaml").read_text())["services"]


def genserve_services() -> dict:
    return {n: s for n, s in services().items() if s.get("image") == "genserve:cpu"}


def test_roles_and_one_database():
    svcs = genserve_services()
    roles = {n: s["command"][s["command"].index("--role") + 1] for n, s in svcs.items() if "--role" in s["command"]}
    assert sorted(roles.values()) == ["engine", "engine", "gateway", "gateway"], roles
    image_env, _ = dockerfile(ROOT / "deploy" / "docker" / "Dockerfile.cpu")
    dsns = set()
    for name, svc in svcs.items():
        args = build_parser().parse_args(svc["command"])  # the CLI accepts each command as written
        env = {**image_env, **{k: str(v) for k, v in svc["environment"].items()}}
        config = load_config(None, env=env)
        assert config.store.backend == "postgres", name
        dsns.add(config.store.dsn)
        if getattr(args, "role", None) in ("gateway", "engine"):
            assert svc["depends_on"]["db-upgrade"]["condition"] == "service_completed_successfully"
            assert svc["restart"] == "always"  # an engine that lost the lock exits and comes back as standby
        if getattr(args, "role", None) == "gateway":
            assert starts(svc["command"], env, Path("/tmp/genserve-ha-check")) is None  # keys required on 0.0.0.0
    [dsn] = dsns
    host = re.match(r"postgresql://[^@]+@([^:/]+)", dsn).group(1)
    pg = services()[host]
    assert pg["image"].startswith("postgres:15") and "pg_isready" in pg["healthcheck"]["test"]
    assert dsn.endswith("/" + pg["environment"]["POSTGRES_DB"])
    assert svcs["db-upgrade"]["command"] == ["db", "upgrade"]
    assert svcs["db-upgrade"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_proxy_sends_to_both_gateways_unbuffered():
    svcs = services()
    conf = (HA / "nginx.conf").read_text()
    upstream = re.findall(r"server (\S+):(\d+)", conf)
    gateways = {n: s for n, s in genserve_services().items() if "gateway" in s["command"]}
    assert sorted(h for h, _ in upstream) == sorted(gateways)
    for host, port in upstream:
        cmd = gateways[host]["command"]
        assert cmd[cmd.index("--port") + 1] == port
    assert "proxy_buffering off" in conf and "proxy_next_upstream error;" in conf
    mount = svcs["proxy"]["volumes"][0].split(":")
    assert (HA / mount[0]).resolve() == (HA / "nginx.conf").resolve()
    assert set(svcs["proxy"]["depends_on"]) == set(gateways)
