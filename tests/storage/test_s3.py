"""The S3 result store against a real S3 API over HTTP (moto's server on loopback)."""
from __future__ import annotations

import httpx
import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto")

from genserve.storage.open import open_store  # noqa: E402
from genserve.storage.s3 import S3ResultStore  # noqa: E402
from genserve.testing import s3_server  # noqa: E402


@pytest.fixture(scope="module")
def endpoint():
    with s3_server("results") as url:
        yield url


def test_put_read_head_delete(endpoint):
    store = open_store({"store": "s3", "bucket": "results", "prefix": "out/", "endpoint_url": endpoint,
                        "region": "us-east-1"})
    ref = store.put("job1", "output.png", b"png bytes", "image/png")
    assert ref.key == "job1/output.png" and ref.bytes == 9
    assert store.exists("job1/output.png") and not store.exists("job2/output.png")
    assert store.read("job1/output.png") == b"png bytes"
    obj = store.client.head_object(Bucket="results", Key="out/job1/output.png")  # under the prefix
    assert obj["ContentType"] == "image/png"
    assert store.head("job1/output.png").bytes == 9
    assert store.delete("job1/output.png") == 9
    assert store.delete("job1/output.png") == 0  # idempotent
    assert not store.exists("job1/output.png")


def test_large_output_goes_up_in_parts_and_presigned_url_serves_it(endpoint):
    store = S3ResultStore("results", "big/", endpoint_url=endpoint, region="us-east-1",
                          multipart_threshold=5 << 20, part_bytes=5 << 20)
    data = bytes(range(256)) * (6 << 12)  # 6 MiB: above the threshold
    store.put("vid", "output.mp4", data, "video/mp4")
    etag = store.client.head_object(Bucket="results", Key="big/vid/output.mp4")["ETag"]
    assert etag.strip('"').endswith("-2")  # a multipart upload's ETag counts its parts
    url = store.presigned_url("vid/output.mp4", "vid-output.mp4")
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == data


def test_proxy_mode_has_no_url_and_bad_keys_are_refused(endpoint):
    store = S3ResultStore("results", endpoint_url=endpoint, region="us-east-1", serve="proxy")
    assert store.presigned_url("a/output.png", "x.png") is None
    with pytest.raises(ValueError):
        store.put("../etc", "output.png", b"x", "image/png")
    assert not store.exists("../x/output.png")
