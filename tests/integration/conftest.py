import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from genserve.bench.live import LiveServer


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> Path:
    """The demo pipelines, built once per test session through the same builder the server uses."""
    root = tmp_path_factory.mktemp("models")
    for kind in ("image", "video"):
        subprocess.run([sys.executable, "-m", "genserve.backends.demo", kind, str(root / f"demo-{kind}")],
                       check=True, capture_output=True)
    return root


def catalog(models: Path, **overrides) -> str:
    image_batch = overrides.get("image_batch", 8)
    image_wait = overrides.get("image_wait_ms", 1000)
    return f"""
[server]
aging_s = 30

[models.demo-image]
kind = "image"
source = "{models / 'demo-image'}"
max_batch_size = {image_batch}
max_wait_ms = {image_wait}
sizes = ["64x64", "128x64", "64x128", "128x128"]
default_size = "64x64"
default_steps = 4
max_steps = 400
default_guidance = 1.0

[models.demo-video]
kind = "video"
source = "{models / 'demo-video'}"
max_batch_size = 2
max_wait_ms = 0
max_pixels = 16384
size_multiple = 16
default_size = "64x64"
default_steps = 4
max_steps = 50
default_guidance = 1.0
default_frames = 9
max_frames = 17
frame_stride = 4

# Jobs for this model wait ten minutes for company: they stay queued for the test's lifetime.
[models.slow-lane]
kind = "image"
source = "{models / 'demo-image'}"
max_batch_size = 8
max_wait_ms = 600000
max_queue = 2
sizes = ["64x64"]
default_steps = 2
"""


@pytest.fixture(scope="module")
def server(demo_models, tmp_path_factory):
    srv = LiveServer(tmp_path_factory.mktemp("srv"), catalog(demo_models), workers=1).start()
    yield srv
    srv.stop()


def _http(srv: LiveServer):
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


@pytest.fixture
def client(server):
    yield from _http(server)


OBS_PRICE_CPU = 36.0  # US$/h: 1 cent per device-second, so test costs are readable


@pytest.fixture(scope="session")
def obs_server(demo_models, tmp_path_factory):
    """One server for the observability, dashboard and bench tests: JSON logs and a CPU price.
    Tests on it compare deltas or job records, never absolute totals of a fresh server."""
    text = catalog(demo_models) + f"\n[prices]\ncpu = {OBS_PRICE_CPU}\n"
    srv = LiveServer(tmp_path_factory.mktemp("obs"), text, workers=1, extra_args=["--log-format", "json"]).start()
    yield srv
    srv.stop()


@pytest.fixture
def obs_client(obs_server):
    yield from _http(obs_server)
