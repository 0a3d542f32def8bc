"""`genserve bench` against the live server: the result file's counts match the server's records."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def bench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "genserve.cli", "bench", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_bench_result_matches_job_records(obs_server, obs_client, tmp_path):
    wl = tmp_path / "w.toml"
    wl.write_text('[arrival]\npattern = "bursts"\nburst_size = 4\nburst_interval_s = 0.5\n'
                  '[[requests]]\nmodel = "demo-image"\nsize = "64x64"\nsteps = 2\nweight = 3\n'
                  '[[requests]]\nmodel = "demo-video"\nsize = "64x64"\nsteps = 2\nnum_frames = 5\n')
    p = bench("--url", obs_server.url, "-n", "8", "--workload", str(wl), "--out", "r.json", "--plot", "r.png",
              "--label", "live", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    s = res["summary"]
    assert (s["count"], s["ok"], s["errors"]) == (8, 8, 0) and res["config"]["arrival"]["pattern"] == "bursts"
    sends = sorted(r["t_sent"] for r in res["requests"])
    assert sends[4] - sends[0] >= 0.45  # the second burst left half a second after the first
    jobs = {r["job_id"]: obs_client.get(f"/v1/jobs/{r['job_id']}").json() for r in res["requests"]}
    assert len(jobs) == 8 and all(j["status"] == "succeeded" for j in jobs.values())
    per_model = {m: sum(1 for j in jobs.values() if j["model"] == m) for m in ("demo-image", "demo-video")}
    assert {m: v["count"] for m, v in s["per_model"].items()} == {m: n for m, n in per_model.items() if n}
    # Server-side figures come from the job records.
    assert s["cost_per_inference_usd"] == pytest.approx(sum(j["cost"]["usd"] for j in jobs.values()) / 8)
    assert s["device_seconds"] == pytest.approx(sum(j["cost"]["device_seconds"] for j in jobs.values()))
    assert s["stages_s"]["inference"]["count"] == 8
    for r in res["requests"]:
        assert r["latency_s"] >= jobs[r["job_id"]]["breakdown"]["total_s"] - 0.05  # client sees at least the server's time
    assert "| **all** | 8 | 8 | 0 |" in p.stdout and "| queue_wait |" in p.stdout
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The OpenAI-compatible route of the same server, then the two side by side.
    p = bench("--url", obs_server.url + "/v1", "--api", "openai", "-n", "3", "-c", "3", "--out", "o.json", "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    o = json.loads((tmp_path / "o.json").read_text())
    assert o["summary"]["ok"] == 3 and "stages_s" not in o["summary"]
    p = bench("--compare", "r.json", "o.json", cwd=tmp_path)
    assert p.returncode == 0 and "| requests | 8 | 3 | 0.38× |" in p.stdout
