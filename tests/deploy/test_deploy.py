"""The container images and the compose stack against the current code, without a container tool:
the settings each image and the compose service start `serve` with must load, and `serve` must
agree to start with them on 0.0.0.0 in a fresh /data (no keys yet), which it refuses when the API
would be open to anyone. Prometheus must be able to read /metrics once keys are required."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from genserve.config.load import load_config
from genserve.server.security.auth import bind_refusal
from genserve.server.security.keys import KeyStore

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*"))


def dockerfile(path: Path) -> tuple[dict[str, str], list[str]]:
    """(ENV variables, CMD) of a Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text())  # join continued lines
    env: dict[str, str] = {}
    cmd: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line[4:])))
        elif line.startswith("CMD "):
            cmd = json.loads(line[4:])
    return env, cmd


def starts(cmd: list[str], env: dict[str, str], tmp_path: Path) -> str | None:
    """What `genserve serve` would answer to ``cmd`` under ``env`` in an empty data dir: None if it starts."""
    assert cmd[0] == "serve"
    host = cmd[cmd.index("--host") + 1]
    config = load_config(None, env=env).with_overrides(data_dir=tmp_path / "data")
    keys = KeyStore(config.server.data_dir)
    try:
        return bind_refusal(host, keys, config.access, "--insecure" in cmd)
    finally:
        keys.close()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_each_image_starts_with_keys_required(path, tmp_path):
    env, cmd = dockerfile(path)
    assert cmd[:3] == ["serve", "--host", "0.0.0.0"] and "--insecure" not in cmd
    assert starts(cmd, env, tmp_path) is None
    config = load_config(None, env=env)
    assert config.access.auth.required is True and str(config.server.data_dir) == "/data"


def test_the_compose_service_starts_and_prometheus_can_read_metrics(tmp_path):
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    svc = compose["services"]["genserve"]
    image_env, _ = dockerfile(ROOT / "deploy" / "docker" / svc["build"]["dockerfile"].split("/")[-1])
    env = {**image_env, **{k: str(v) for k, v in svc["environment"].items()}}
    assert starts(svc["command"], env, tmp_path) is None
    config = load_config(None, env=env)
    assert config.results.store == "s3" and config.results.endpoint_url == "http://minio:9000"
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "genserve"]
    assert job["static_configs"][0]["targets"] == ["genserve:8000"] and job["metrics_path"] == "/metrics"
    assert job["authorization"]["credentials"] == config.access.auth.metrics_token
