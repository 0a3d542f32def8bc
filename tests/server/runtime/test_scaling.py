"""Autoscaling through the runtime on the fake pool (issue 22.7): a scale-down cancels a worker that
is still starting before it retires idle ones, and a canceled worker never comes up."""
from __future__ import annotations

from genserve.config.load import parse_config
from genserve.server.runtime.runtime import Runtime
from genserve.workers.fake import FakePool

from .test_runtime import MB, Clock, run


def test_a_scale_down_cancels_the_pending_worker_first_and_it_never_comes_up(tmp_path):
    # issue 22.7 on the fake pool: 3 workers up and a 4th still starting when the load goes away.
    async def go():
        cfg = parse_config(__import__("tomllib").loads(f"""
[server]
data_dir = "{tmp_path}"
workers = 4
[autoscale]
min_devices = 1
max_devices = 4
interval_s = 5
scale_down_delay_s = 10
[models.img]
kind = "image"
source = "{tmp_path}/no-weights-needed"
default_size = "64x64"
"""))
        clock = Clock()
        rt = Runtime(cfg, devices=["cpu"] * 4, clock=clock, pool=FakePool)
        await rt.start()
        pool: FakePool = rt.pool  # type: ignore[assignment]
        for w in ("w0", "w1", "w2"):
            pool.ready(w, 1024 * MB)
        assert not pool.retired  # the fleet as started is kept for the scale-down delay
        clock.t += 11
        rt.kick()
        assert pool.retired[0] == "w3" and len(pool.retired) == 3  # the pending one first, then two idle
        # A ready it sent before it was canceled, arriving late: it does not come up in the engine.
        pool.say("w3", "ready", worker="w3", device="cpu", device_name="cpu", pid=0, threads=1,
                 capacity_bytes=1024 * MB)
        assert "w3" not in rt.engine.workers and len(rt.engine.workers) == 1 and rt.ready
        await rt.close()
    run(go())
