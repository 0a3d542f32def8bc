"""Readiness (issue 22.3): ready means the API accepts jobs and at least one worker is ready or held;
with every worker down, not ready, whatever came before. On the fake pool; the held case (a cluster
worker that outlived the server) is in test_reattach.py, the real processes in
tests/integration/test_failures.py."""
from __future__ import annotations

from genserve.config.load import parse_config
from genserve.server.runtime.runtime import Runtime
from genserve.workers.fake import FakePool

from .test_runtime import MB, Clock, World, config, run


def test_one_ready_worker_is_enough_and_none_is_not_ready(tmp_path):
    async def go():
        w = await World(tmp_path, workers=2).start(ready=False)
        assert not w.rt.ready and w.rt.worker_readiness() == {"w0": False, "w1": False}
        w.pool.ready("w0", 1024 * MB)  # w1 still starting: the server can run jobs already
        assert w.rt.ready and w.rt.worker_readiness() == {"w0": True, "w1": False}
        w.pool.crash("w0")  # every worker down: not ready, though it was
        assert not w.rt.ready and w.rt.worker_readiness() == {"w0": False, "w1": False}
        w.pool.ready("w1", 1024 * MB)
        assert w.rt.ready
        w.pool.ready("w0", 1024 * MB)
        w.pool.crash("w1")
        assert w.rt.ready  # w0 is back
        await w.rt.drain(0)
        assert not w.rt.ready  # draining: never ready
        await w.rt.close()
    run(go())


def test_quarantined_and_retiring_workers_do_not_count(tmp_path):
    async def go():
        w = await World(tmp_path, workers=2).start(ready=False)
        w.pool.ready("w0", 1024 * MB)
        w.pool.workers["w0"].retiring = True  # being scaled down: about to leave
        w.pool.workers["w1"].quarantined = True
        assert not w.rt.ready and w.rt.worker_readiness() == {"w1": False}
        await w.rt.close()
    run(go())


def test_a_fleet_empty_by_design_is_ready(tmp_path):
    async def go():
        # workers = 0: an API-only node accepts and persists jobs; nothing to wait for.
        rt = Runtime(config(tmp_path / "a"), devices=[], clock=Clock(), pool=FakePool)
        await rt.start()
        assert rt.ready and rt.worker_readiness() == {}
        await rt.close()
        # Autoscaling down to zero: the first job is what brings a worker up, so the server must
        # take it while no worker is up (and while the first one starts).
        cfg = parse_config(__import__("tomllib").loads(f"""
[server]
data_dir = "{tmp_path / 'b'}"
[autoscale]
min_devices = 0
max_devices = 2
[models.img]
kind = "image"
source = "{tmp_path}/no-weights-needed"
default_size = "64x64"
"""))
        rt = Runtime(cfg, devices=["cpu"], clock=Clock(), pool=FakePool)
        await rt.start()
        assert rt.ready
        await rt.close()
    run(go())

