"""s3:// model sources: downloaded once per node into the cache, atomically, even when two workers
ask at once (real S3 API over HTTP: moto's server on loopback)."""
from __future__ import annotations

import threading

import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto")

from genserve.bench.live import s3_server  # noqa: E402
from genserve.storage.model_cache import fetch_model, parse_s3  # noqa: E402


def test_parse_s3():
    assert parse_s3("s3://b/models/sd/") == ("b", "models/sd/")
    assert parse_s3("s3://b") == ("b", "")
    with pytest.raises(ValueError):
        parse_s3("/local/dir")


def test_two_workers_on_a_node_download_once(tmp_path):
    import boto3

    files = {"model_index.json": b'{"x": 1}', "unet/config.json": b"{}", "unet/weights.bin": b"w" * 100_000}
    with s3_server("models") as url:
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        for rel, data in files.items():
            s3.put_object(Bucket="models", Key=f"zoo/tiny/{rel}", Body=data)
        results: list = []

        def fetch():
            results.append(fetch_model("s3://models/zoo/tiny", tmp_path, endpoint_url=url))

        threads = [threading.Thread(target=fetch) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        (p1, d1), (p2, d2) = results
        assert p1 == p2 and sorted([d1, d2]) == [False, True]  # one download, the other waited for it
        assert {str(f.relative_to(p1)): f.read_bytes() for f in p1.rglob("*") if f.is_file()} == files
        assert fetch_model("s3://models/zoo/tiny", tmp_path, endpoint_url=url) == (p1, False)
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # nothing half-written left
        with pytest.raises(FileNotFoundError):
            fetch_model("s3://models/zoo/missing", tmp_path, endpoint_url=url)
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
