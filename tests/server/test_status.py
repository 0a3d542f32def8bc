"""The job lifecycle's one definition."""
from genserve.server.status import TERMINAL, JobStatus, is_terminal


def test_terminal_statuses_are_exactly_the_three_outcomes():
    assert {s for s in JobStatus if s.is_terminal} == {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
    assert not JobStatus.QUEUED.is_terminal and not JobStatus.RUNNING.is_terminal
    assert TERMINAL == {s for s in JobStatus if s.is_terminal}


def test_plain_strings_from_the_store_and_sse_compare_as_statuses():
    # Records and SSE event names are plain strings; the enum is a str, so they meet without casts.
    assert is_terminal("failed") and is_terminal(JobStatus.CANCELED)
    assert not is_terminal("queued") and not is_terminal(None) and not is_terminal("progress")
    assert JobStatus("succeeded") is JobStatus.SUCCEEDED and JobStatus.SUCCEEDED == "succeeded"
