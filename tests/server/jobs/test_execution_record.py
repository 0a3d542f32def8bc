"""What ran is kept in the job record: the worker's ``execution`` (step cache, steps computed and
reused, prompt cache, compile mode) on success, and the ``compile_s`` of the load a job waited for
(inside its cold start)."""
import pytest

from genserve.server.jobs.jobstore import JobStore
from genserve.server.jobs.records import JobRecords
from genserve.server.status import JobStatus


@pytest.fixture
def records(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.insert("j1", None, {"model": "m", "prompt": "a fox", "priority": "standard"}, 1.0)
    store.update(["j1"], status=JobStatus.RUNNING)
    events = []
    yield JobRecords(store, None, {}, events.append), events
    store.close()


def test_execution_and_compile_time_are_recorded(records):
    rec, events = records
    rec.model_loaded(("j1",), {"load_start": 2.0, "load_end": 9.0, "tier": "disk", "compile_s": 6.5})
    ex = {"cache": {"method": "deep", "interval": 3}, "steps_computed": 7, "steps_reused": 13,
          "prompt_cache": "hit", "compiled": "full"}
    rec.output_written("j1", {"result": {"key": "j1/output.png"}, "inference_start": 9.0, "inference_end": 10.0,
                              "output_written": 10.5, "execution": ex}, 11.0)
    job = rec.store.get("j1")
    assert job["status"] == JobStatus.SUCCEEDED and job["execution"] == ex
    assert job["compile_s"] == 6.5 and job["t_load_end"] - job["t_load_start"] >= job["compile_s"]
    assert events[-1].record["execution"] == ex  # what the observer counts from


def test_a_load_without_compile_records_none(records):
    rec, _ = records
    rec.model_loaded(("j1",), {"load_start": 2.0, "load_end": 3.0, "tier": "disk", "compile_s": 0.0})
    assert rec.store.get("j1")["compile_s"] is None and rec.store.get("j1")["execution"] is None
