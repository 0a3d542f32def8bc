"""The LoRA registry on both store backends: on PostgreSQL the table is the shared database's (made by
its migrations), so an adapter registered through one process is seen by every gateway and engine."""
from __future__ import annotations

import pytest

from genserve.backends.demo import ensure_demo_model
from genserve.server.jobs.loras import LoraRegistry
from genserve.server.jobs.store.postgres import PgJobStore
from genserve.storage import LocalResultStore
from tests.lora_adapters import save_adapter


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return ensure_demo_model("image", tmp_path_factory.mktemp("models") / "demo-image")


@pytest.fixture(scope="module")
def ink(demo_dir, tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("a") / "ink.safetensors", demo_dir, rank=4, seed=1).read_bytes()


@pytest.fixture(params=["sqlite", "postgres"])
def where(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "jobs.db"
    dsn = request.getfixturevalue("pg_database")
    PgJobStore(dsn).close()  # its migrations make the loras table
    return dsn


def test_register_find_list_delete_on_both_backends(where, tmp_path, demo_dir, ink):
    results = LocalResultStore(tmp_path / "results")
    a = LoraRegistry(where, results, {"img": demo_dir}, 1 << 30)
    made = a.register("ink", "img", ink, "acme")
    assert made["owner"] == "acme" and made["rank"] == 4 and made["bytes"] > 0
    b = LoraRegistry(where, results, {"img": demo_dir}, 1 << 30)  # another process over the same store
    assert b.find("ink", "acme")["id"] == made["id"]
    assert b.find("ink", "other") is None  # another tenant's upload is not visible
    assert [x["name"] for x in b.list("acme")] == ["ink"] and b.list("other") == []
    assert b.sizes([made["id"]]) == {made["id"]: made["bytes"]}
    again = a.register("ink", "img", ink, "acme", replace=True)  # replacing keeps one row
    assert again["id"] == made["id"] and len(b.list("acme")) == 1
    b.delete(b.find("ink", "acme"))
    assert a.find("ink", "acme") is None
    a.close()
    b.close()
