"""Outputs end to end on a live server whose result store is S3 (moto's real S3 API on loopback):
the worker process writes each output and its thumbnail to the bucket, the video is a faststart
MP4, ``?variant=thumbnail`` redirects to a presigned URL of the thumbnail, and DELETE leaves no
object behind in the bucket."""
from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

pytest.importorskip("boto3")
pytest.importorskip("moto")

from genserve.bench.live import LiveServer, s3_server, wait_for  # noqa: E402

from ..backends.test_encode import decode_mp4, top_level_boxes  # noqa: E402
from .conftest import catalog  # noqa: E402

pytestmark = pytest.mark.slow
BUCKET = "genserve-results"


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as url:
        yield url


@pytest.fixture(scope="module")
def s3_client(demo_models, s3, tmp_path_factory):
    text = catalog(demo_models) + f"""
[results]
store = "s3"
bucket = "{BUCKET}"
prefix = "out/"
endpoint_url = "{s3}"
region = "us-east-1"
"""
    with LiveServer(tmp_path_factory.mktemp("s3srv"), text, workers=1) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


def bucket_keys(s3: str) -> set[str]:
    import boto3

    out = boto3.client("s3", endpoint_url=s3, region_name="us-east-1").list_objects_v2(Bucket=BUCKET, Prefix="out/")
    return {o["Key"] for o in out.get("Contents", [])}


def fetch(c: httpx.Client, url: str, s3: str) -> httpx.Response:
    """A result URL: the server redirects to a presigned URL on the object store, which serves it."""
    r = c.get(url)
    assert r.status_code == 307 and r.headers["location"].startswith(s3), (r.status_code, r.text[:200])
    got = httpx.get(r.headers["location"])
    assert got.status_code == 200
    return got


def test_video_and_image_outputs_with_thumbnails_on_s3(s3_client, s3):
    c = s3_client
    video = c.post("/v1/jobs", json={"model": "demo-video", "prompt": "a boat", "steps": 2, "width": 96,
                                     "height": 64, "num_frames": 9}).json()
    image = c.post("/v1/jobs", json={"model": "demo-image", "prompt": "a fox", "steps": 2, "width": 128,
                                     "height": 64}).json()
    for job, (w, h), name in ((video, (96, 64), "output.mp4"), (image, (128, 64), "output.png")):
        done = wait_for(c, job["id"], timeout=300)
        assert done["status"] == "succeeded", done["error"]
        [res] = done["results"]
        assert res["thumbnail_url"] == res["url"] + "?variant=thumbnail"
        thumb = fetch(c, res["thumbnail_url"], s3)
        img = Image.open(io.BytesIO(thumb.content))
        assert img.format == "JPEG" and img.size == (w, h)  # under 256 px: not scaled
        out = fetch(c, res["url"], s3).content
        assert len(out) == res["bytes"]
        if name == "output.mp4":
            boxes = top_level_boxes(out)
            assert boxes.index("moov") < boxes.index("mdat"), boxes  # faststart: playable from the first bytes
            stream, frames = decode_mp4(out)
            assert len(frames) == 9 and frames[0].shape == (h, w, 3)
        assert {f"out/{job['id']}/{name}", f"out/{job['id']}/thumbnail.jpg"} <= bucket_keys(s3)
    for job in (video, image):
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not {k for k in bucket_keys(s3) if k.split("/")[1] in (video["id"], image["id"])}  # no orphans
