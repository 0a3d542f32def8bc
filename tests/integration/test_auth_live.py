"""Keys end to end: the real CLI (`genserve keys`) against a real `genserve serve` process, which
sees created and revoked keys without a restart; `serve` refuses a public bind without keys."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from genserve.bench.live import LiveServer

pytestmark = pytest.mark.slow

CONFIG = """
[models.img]
kind = "image"
source = "{root}/no-weights"
default_size = "64x64"
"""


def genserve(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genserve.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_keys_cli_and_a_running_server(tmp_path):
    data = tmp_path / "data"
    with LiveServer(data, CONFIG.format(root=tmp_path), workers=0) as srv:
        # No key yet, on loopback: open; the job belongs to the default tenant.
        r = httpx.post(f"{srv.url}/v1/jobs", json={"model": "img", "prompt": "before keys"}, timeout=10)
        assert r.status_code == 202 and r.json()["tenant"] == "default"
        out = genserve("keys", "create", "--tenant", "acme", "--data-dir", str(data))
        assert out.returncode == 0, out.stderr
        key = out.stdout.strip().splitlines()[-1]
        assert key.startswith("gsk_") and len(key) > 40
        assert key not in (data / "keys.db").read_bytes().decode("latin-1")  # stored hashed
        r = httpx.get(f"{srv.url}/v1/jobs", timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        auth = {"Authorization": f"Bearer {key}"}
        r = httpx.post(f"{srv.url}/v1/jobs", json={"model": "img", "prompt": "acme's"}, headers=auth, timeout=10)
        assert r.status_code == 202 and r.json()["tenant"] == "acme"
        assert [j["params"]["prompt"] for j in httpx.get(f"{srv.url}/v1/jobs", headers=auth).json()["data"]] == ["acme's"]
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        # The CLI clients send the key too.
        out = genserve("models", "--url", srv.url, "--json", env={"GENSERVE_API_KEY": key})
        assert out.returncode == 0 and '"img"' in out.stdout, out.stderr
        assert genserve("models", "--url", srv.url).returncode == 1
        listed = genserve("keys", "list", "--data-dir", str(data))
        assert "acme" in listed.stdout and key not in listed.stdout
        key_id = listed.stdout.splitlines()[1].split()[0]
        assert genserve("keys", "revoke", key_id, "--data-dir", str(data)).returncode == 0
        assert httpx.get(f"{srv.url}/v1/jobs", headers=auth, timeout=10).status_code == 401
        assert genserve("keys", "revoke", key_id, "--data-dir", str(data)).returncode == 1  # already revoked


def test_serve_refuses_a_public_bind_without_keys(tmp_path):
    # Refused before anything binds: no traffic leaves the machine.
    out = genserve("serve", "--host", "0.0.0.0", "--port", "1", "--data-dir", str(tmp_path / "d"),
                   "--config", str(_config(tmp_path)))
    assert out.returncode == 2 and "--insecure" in out.stderr and "genserve keys create" in out.stderr


def test_keys_create_rejects_bad_input(tmp_path):
    out = genserve("keys", "create", "--tenant", "bad name!", "--data-dir", str(tmp_path))
    assert out.returncode == 2 and "tenant" in out.stderr


def _config(tmp_path):
    p = tmp_path / "genserve.toml"
    p.write_text(CONFIG.format(root=tmp_path))
    return p
