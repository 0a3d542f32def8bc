"""LoRA adapters through an S3 result store (moto's server on loopback): the registry stores the
file there, a worker's adapter cache reads it back from there (any node could), and an s3://
source is fetched and registered."""
from __future__ import annotations

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto")

from genserve.backends.demo import ensure_demo_model  # noqa: E402
from genserve.backends.lora_apply import AdapterCache  # noqa: E402
from genserve.backends.lora_file import base_modules  # noqa: E402
from genserve.bench.live import s3_server  # noqa: E402
from genserve.server.jobs.loras import LoraRegistry  # noqa: E402
from genserve.storage.model_cache import fetch_object  # noqa: E402
from genserve.storage.open import open_store  # noqa: E402
from tests.lora_adapters import save_adapter  # noqa: E402


def test_registry_and_worker_cache_over_s3(tmp_path):
    demo = ensure_demo_model("image", tmp_path / "demo-image")
    data = save_adapter(tmp_path / "ink.safetensors", demo, rank=4, layout="kohya").read_bytes()
    with s3_server("results", "adapters") as url:
        store = open_store({"store": "s3", "bucket": "results", "prefix": "gs/", "endpoint_url": url,
                            "region": "us-east-1"})
        reg = LoraRegistry(tmp_path / "jobs.db", store, {"img": demo}, 1 << 20)
        view = reg.register("ink", "img", data, None)
        assert store.read(f"loras/{view['id']}.safetensors") == data
        cache = AdapterCache(store, "cpu", 1 << 20)  # a worker on another node: only the store is shared
        adapter, tier = cache.get(view["id"], modules=base_modules(demo))
        assert tier == "storage" and len(adapter.layers) == 32 and adapter.bytes > 0
        assert cache.get(view["id"])[1] == "device"
        import boto3

        boto3.client("s3", endpoint_url=url, region_name="us-east-1").put_object(
            Bucket="adapters", Key="styles/paper.safetensors", Body=data)
        fetch = lambda src: fetch_object(src, endpoint_url=url, region="us-east-1")  # noqa: E731
        got = reg.register_source("paper", "img", "s3://adapters/styles/paper.safetensors", fetch=fetch)
        assert got["id"] == view["id"] and got["source"] == "s3://adapters/styles/paper.safetensors"
        reg.delete(view)
        assert store.exists(f"loras/{view['id']}.safetensors")  # "paper" holds the same bytes
        reg.delete(got)
        assert not store.exists(f"loras/{view['id']}.safetensors")
        reg.close()
