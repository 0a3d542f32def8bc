"""The OpenAI Videos API through a real server with real pipelines, driven by the official
``openai`` client: text-to-video on the demo video model, image-to-video on a tiny Wan I2V
checkpoint with an uploaded ``input_reference``; create -> poll -> download -> list -> delete."""
import io

import av
import openai
import pytest
from PIL import Image

from genserve.bench.live import LiveServer, wait_until
from tests.family_models import build_all

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]


@pytest.fixture(scope="module")
def server(demo_models, tmp_path_factory):
    i2v = build_all(tmp_path_factory.mktemp("i2v-model"), names=("wan-i2v",))["wan-i2v"]
    toml = f"""
[models.demo-video]
kind = "video"
source = "{demo_models / 'demo-video'}"
max_batch_size = 2
max_pixels = 16384
size_multiple = 16
default_size = "64x64"
default_steps = 2
default_guidance = 1.0
default_frames = 9
max_frames = 17
frame_stride = 4
fps = 8

[models.i2v]
kind = "video"
source = "{i2v}"
dtype = "float32"
max_batch_size = 2
default_size = "32x32"
default_steps = 2
default_guidance = 3.0
default_frames = 5
max_frames = 9
max_sequence_length = 16
fps = 4
"""
    with LiveServer(tmp_path_factory.mktemp("videos-server"), toml, workers=1) as s:
        yield s


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def finished(client, video_id: str, timeout: float = 300.0):
    def done():
        v = client.videos.retrieve(video_id)
        assert 0 <= v.progress <= 100 and v.status in ("queued", "in_progress", "completed", "failed")
        return v if v.status in ("completed", "failed") else None
    return wait_until(done, timeout, f"video {video_id} to finish", every=0.25)


def frames_of(mp4: bytes) -> list:
    assert mp4[4:8] == b"ftyp"  # an MP4 (ISO BMFF) file
    with av.open(io.BytesIO(mp4)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_create_poll_download_list_delete(server, client):
    t2v = client.videos.create(model="demo-video", prompt="a paper boat", seconds="2", size="64x48",
                               extra_body={"seed": 7})
    assert (t2v.object, t2v.model, t2v.seconds, t2v.size) == ("video", "demo-video", "2.125", "64x48")
    png = io.BytesIO()
    Image.new("RGB", (48, 40), (250, 250, 250)).save(png, "PNG")
    i2v = client.videos.create(model="i2v", prompt="waves", seconds="2", input_reference=("first.png", png.getvalue(),
                                                                                          "image/png"))
    assert (i2v.seconds, i2v.size) == ("2.25", "32x32")  # 2 s x 4 fps = 8 -> 9 frames (stride 4)

    v = finished(client, t2v.id)
    assert (v.status, v.progress, v.error) == ("completed", 100, None) and v.completed_at >= v.created_at
    frames = frames_of(client.videos.download_content(t2v.id).read())
    assert len(frames) == 17 and frames[0].shape == (48, 64, 3)
    v = finished(client, i2v.id)
    assert v.status == "completed", v
    frames = frames_of(client.videos.download_content(i2v.id, variant="video").read())
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)

    # the thumbnail: a JPEG of the middle frame, through the official client's variant too
    thumb = client.videos.download_content(t2v.id, variant="thumbnail").read()
    img = Image.open(io.BytesIO(thumb))
    assert img.format == "JPEG" and img.size == (64, 48)

    page = client.videos.list(limit=1)
    assert [x.id for x in page.data] == [i2v.id] and page.has_more is True
    page = client.videos.list(limit=1, after=i2v.id)
    assert [x.id for x in page.data] == [t2v.id] and page.has_more is False
    assert [x.id for x in client.videos.list(order="asc")] == [t2v.id, i2v.id]

    for vid in (t2v.id, i2v.id):
        assert client.videos.delete(vid).deleted is True
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(vid)
        with pytest.raises(openai.NotFoundError):
            client.videos.download_content(vid)
    assert client.videos.list().data == []


def test_refusals_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(model="demo-video", prompt="too long", seconds="12")
    assert e.value.body["param"] == "seconds" and "at most 17 frames" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(model="i2v", prompt="needs a frame")  # image-to-video without input_reference
    assert e.value.body["param"] == "input_reference"
