"""Secrets in logs (issue 22, item 5): every line ``configure`` sets up is redacted — credential-like
query parameters, Bearer / Basic credentials, gsk_ keys and whsec_ secrets — in messages, their
arguments and exception text, in both formats; and uvicorn's real access log of a real server (a key
sent in the query string, refused) shows the request without the key."""
from __future__ import annotations

import json
import logging
import threading
import tomllib

import httpx
import pytest
import uvicorn

from genserve.bench.live import free_port, wait_until
from genserve.config.load import parse_config
from genserve.server.http.app import create_app
from genserve.server.observe.logs import configure, redact
from genserve.server.runtime.runtime import Runtime
from genserve.server.security.keys import KeyStore
from genserve.workers.fake import FakePool

KEY = "gsk_" + "S3cr3tKeyMaterial-abcdefghijklmnopqrstuvwxyz0"
TOKEN = "metrics-T0ken-0123456789"


@pytest.fixture
def logs(capsys):
    """configure() for the test (the handler writes to the captured stderr), undone afterwards."""
    root = logging.getLogger()
    names = ("uvicorn", "uvicorn.access", "uvicorn.error")
    saved = root.handlers[:], root.level, {n: (lg.filters[:], lg.handlers[:], lg.propagate, lg.level)
                                           for n in names for lg in [logging.getLogger(n)]}

    def read() -> str:
        return capsys.readouterr().err

    yield read
    root.handlers[:], level, state = saved
    root.setLevel(level)
    for n, (filters, handlers, propagate, lvl) in state.items():
        lg = logging.getLogger(n)
        lg.filters[:], lg.handlers[:], lg.propagate = filters, handlers, propagate
        lg.setLevel(lvl)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_line_is_redacted(logs, fmt):
    configure(fmt, logging.INFO)
    access = logging.getLogger("uvicorn.access")
    access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                f"/v1/jobs?limit=5&api_key={KEY}&token={TOKEN}&access_token=abc123&key=k1", "1.1", 401)
    logging.getLogger("genserve.x").warning("retrying with headers %s", {"Authorization": f"Bearer {TOKEN}"})
    logging.getLogger("genserve.x").info("webhook secret is whsec_Z2Vuc2VydmUtdGVzdA== and basic auth "
                                         "Basic dXNlcjpwYXNzd29yZA==")
    try:
        raise ValueError(f"bad url http://h/x?X-Amz-Signature=deadbeef99&key={KEY}")
    except ValueError:
        logging.getLogger("genserve.x").exception("upload failed")
    out = logs()
    for secret in (KEY, TOKEN, "abc123", "k1&", "Z2Vuc2VydmUtdGVzdA", "dXNlcjpwYXNzd29yZA", "deadbeef99"):
        assert secret not in out, (secret, out)
    lines = [json.loads(line)["msg"] for line in out.splitlines() if line.startswith("{")] if fmt == "json" else []
    assert "/v1/jobs?limit=5&api_key=[REDACTED]&token=[REDACTED]&access_token=[REDACTED]&key=[REDACTED]" in out
    assert "Bearer [REDACTED]" in out and "upload failed" in out and "ValueError: bad url" in out
    assert fmt == "text" or len(lines) == 4


def test_redaction_leaves_ordinary_text_alone():
    for text in ("auth failure: GET /v1/jobs from 10.0.0.1 (no bearer token)", "GET /v1/jobs?after=j1&limit=5",
                 "key key_0a1b2c (tenant acme) lacks the admin scope", "batch key=img:64x64:s4",
                 "Basic settings were loaded"):
        assert redact(text) == text


def test_the_access_log_of_a_real_server_never_shows_a_key(logs, tmp_path):
    """uvicorn's own access logger, as ``genserve serve --access-log`` runs it (log_config=None)."""
    cfg = parse_config(tomllib.loads(f"""
[server]
data_dir = "{tmp_path}/data"
[models.img]
kind = "image"
source = "{tmp_path}/no-weights"
default_size = "64x64"
"""))
    keys = KeyStore(cfg.server.data_dir)
    _, key = keys.create("acme")  # keys exist: auth is on
    keys.close()
    configure("text", logging.INFO)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, Runtime(cfg, devices=["cpu"], pool=FakePool)),
                                           host="127.0.0.1", port=port, access_log=True, log_config=None,
                                           log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 60, what="the server to start")
        assert server.started
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            assert c.get(f"/v1/jobs?limit=1&api_key={key}").status_code == 401  # refused: the key belongs in a header
            r = c.get(f"/v1/jobs?limit=2&token={key}", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
    out = logs()
    assert '"GET /v1/jobs?limit=1&api_key=[REDACTED] HTTP/1.1" 401' in out, out
    assert '"GET /v1/jobs?limit=2&token=[REDACTED] HTTP/1.1" 200' in out, out
    assert key not in out and key[4:20] not in out


def test_a_database_url_keeps_its_host_and_loses_its_password():
    assert redact("LISTEN connection lost (postgresql://genserve:s3cr3t-pw@db:5432/genserve)") == (
        "LISTEN connection lost (postgresql://genserve:[REDACTED]@db:5432/genserve)")
    for text in ("postgresql://genserve@db:5432/genserve", "http://example.com:8080/a", "see https://x.org/a:b@c"):
        assert redact(text) == text
