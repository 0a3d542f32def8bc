"""The S3 result store against a real S3 API over HTTP (moto's server on loopback)."""
from __future__ import annotations

import httpx
import pytest

pytest.importorskip("boto3")
pytest.importorskip("moto")

from genserve.bench.live import s3_server  # noqa: E402
from genserve.storage.open import open_store  # noqa: E402
from genserve.storage.s3 import S3ResultStore  # noqa: E402


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


def test_retention_and_delete_remove_objects_from_s3(endpoint, tmp_path):
    """The retention sweep (age and size cap) and DELETE's path (``Retention.delete_job``) over the
    S3 store: the objects (outputs and thumbnails) leave the bucket, the byte gauge and counters follow."""
    from prometheus_client import CollectorRegistry

    from genserve.config.retention import DAY_S, RetentionConfig
    from genserve.server.jobs.jobstore import JobStore
    from genserve.server.jobs.listeners import Event
    from genserve.server.jobs.sweeper import Retention
    from genserve.server.status import JobStatus

    t0 = 1_000_000.0
    s3 = S3ResultStore("results", "ret/", endpoint_url=endpoint, region="us-east-1")
    jobs = JobStore(tmp_path / "jobs.db")
    reg = CollectorRegistry()
    ret = Retention(RetentionConfig(results_days=1, jobs_days=10, max_data_bytes=250), jobs, s3, reg, lambda: t0)

    def finished(job_id: str, age_days: float) -> None:  # 100 bytes of output + 20 of thumbnail
        jobs.insert(job_id, None, {"model": "m", "priority": "standard"}, t0)
        ref = s3.put(job_id, "output.png", b"o" * 100, "image/png").to_dict()
        ref["thumbnail"] = s3.put(job_id, "thumbnail.jpg", b"t" * 20, "image/jpeg").to_dict()
        jobs.update([job_id], status=JobStatus.SUCCEEDED, results=[ref], t_finished=t0 - age_days * DAY_S)
        ret.on_event(Event(JobStatus.SUCCEEDED.value, t0, job_id, record=jobs.get(job_id)))  # the runtime's listener

    def in_bucket(job_id: str) -> list[bool]:
        return [s3.exists(f"{job_id}/output.png"), s3.exists(f"{job_id}/thumbnail.jpg")]

    def metric(name: str, **labels) -> float:
        return reg.get_sample_value(name, labels or None) or 0.0

    for job_id, age in (("ancient", 11), ("old", 2), ("new1", 0.5), ("new2", 0.2), ("new3", 0.1)):
        finished(job_id, age)
    out = ret.sweep(t0)
    # jobs_days: "ancient" and its record go; results_days: "old"'s objects go, its record stays;
    # the size cap (3 x 120 > 250): the oldest of the rest, "new1", goes too.
    assert out == {"results": 2, "jobs": 1, "bytes": 360}
    assert jobs.get("ancient") is None and in_bucket("ancient") == [False, False]
    assert jobs.get("old")["results"] == [] and in_bucket("old") == [False, False]
    assert in_bucket("new1") == [False, False] and in_bucket("new2") == [True, True]
    assert metric("genserve_result_bytes_stored") == 240
    assert metric("genserve_result_bytes_deleted_total", reason="jobs_days") == 120
    assert metric("genserve_result_bytes_deleted_total", reason="max_data_bytes") == 120
    # DELETE /v1/jobs/{id} of a finished job: objects and record; a second delete finds nothing.
    assert ret.delete_job(jobs.get("new2")) is True
    assert in_bucket("new2") == [False, False] and jobs.get("new2") is None
    assert metric("genserve_jobs_deleted_total", reason="api") == 1
    assert s3.delete("new2/output.png") == 0
    assert in_bucket("new3") == [True, True]
    jobs.close()
