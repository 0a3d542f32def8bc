"""Durability: jobs accepted before a crash complete after a restart. Uses the built-in demo catalog."""
import subprocess
import sys

import httpx
import pytest

from genserve.bench.live import LiveServer, wait_for

pytestmark = pytest.mark.slow


def test_queued_jobs_survive_kill_9_and_complete_after_restart(tmp_path):
    data = tmp_path / "data"
    # Zero workers: an API-only server accepts and persists jobs but runs none of them.
    srv = LiveServer(data, workers=0).start()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        ids = []
        for i in range(5):
            r = c.post("/v1/jobs", json={"model": "demo-image", "prompt": f"survivor {i}", "id": f"req-{i}",
                                         "priority": ["low", "high"][i % 2]})
            assert r.status_code == 202
            ids.append(r.json()["id"])
        v = c.post("/v1/jobs", json={"model": "demo-video", "prompt": "survivor video", "id": "req-video"})
        ids.append(v.json()["id"])
        assert all(c.get(f"/v1/jobs/{j}").json()["status"] == "queued" for j in ids)
        gone = c.post("/v1/jobs", json={"model": "demo-image", "prompt": "canceled before the crash"}).json()["id"]
        assert c.post(f"/v1/jobs/{gone}/cancel").json()["status"] == "canceled"
    srv.stop(kill=True)

    srv = LiveServer(data, workers=1).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            jobs = [wait_for(c, j) for j in ids]
            assert [j["status"] for j in jobs] == ["succeeded"] * 6
            assert jobs[-1]["results"][0]["content_type"] == "video/mp4"
            # A client retrying its submission after the crash gets the same job, not a new one.
            again = c.post("/v1/jobs", json={"model": "demo-image", "prompt": "survivor 0", "id": "req-0", "priority": "low"})
            assert again.json()["id"] == ids[0] and again.json()["status"] == "succeeded"
            assert c.get(f"/v1/jobs/{ids[0]}/result").headers["content-type"] == "image/png"
            # Subscribers after the job ended see its milestones, rebuilt from the record.
            with c.stream("GET", f"/v1/jobs/{ids[1]}/events") as r:
                names = [line[6:].strip() for line in r.iter_lines() if line.startswith("event:")]
            assert names == ["queued", "started", "succeeded"]
            # For a job that ended before the restart, the milestones are rebuilt from its record.
            assert c.get(f"/v1/jobs/{gone}").json()["status"] == "canceled"
            with c.stream("GET", f"/v1/jobs/{gone}/events") as r:
                names = [line[6:].strip() for line in r.iter_lines() if line.startswith("event:")]
            assert names == ["queued", "canceled"]
    finally:
        srv.stop()
    # The demo models were built into the data directory on first start, as a normal diffusers layout.
    assert (data / "models" / "demo-image" / "model_index.json").exists()
    assert (data / "models" / "demo-video" / "transformer").is_dir()


def test_invalid_config_fails_before_starting_naming_the_key(tmp_path):
    cfg = tmp_path / "genserve.toml"
    cfg.write_text('[models.x]\nkind = "image"\nsource = "demo:image"\nmax_batch_size = 0\n')
    p = subprocess.run([sys.executable, "-m", "genserve.cli", "serve", "--config", str(cfg), "--data-dir",
                        str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "models.x.max_batch_size" in p.stderr
    assert not (tmp_path / "d").exists()


def test_models_command_lists_the_catalog():
    p = subprocess.run([sys.executable, "-m", "genserve.cli", "models"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    assert "demo-image" in p.stdout and "demo-video" in p.stdout
