"""The long-poll transport's core (``ray_actor.drain``), with real queues and threads: a poll
returns the moment the worker has something to say, with everything ready by then, and says when
the stream is over."""
import queue
import threading
import time

import pytest

pytest.importorskip("ray")

from genserve.workers.ray_actor import _END, drain  # noqa: E402


def test_returns_everything_ready_at_once():
    q = queue.Queue()
    for i in range(3):
        q.put({"ev": "progress", "step": i})
    assert drain(q, [], 5.0) == ([{"ev": "progress", "step": i} for i in range(3)], False)
    assert q.empty()


def test_waits_for_the_first_message_and_returns_as_soon_as_it_comes():
    q = queue.Queue()
    emitted = threading.Event()

    def worker():
        emitted.wait()
        q.put({"ev": "started"})

    threading.Thread(target=worker, daemon=True).start()
    t0 = time.monotonic()
    threading.Timer(0.05, emitted.set).start()
    msgs, over = drain(q, [], 30.0)
    assert (msgs, over) == ([{"ev": "started"}], False)
    assert time.monotonic() - t0 < 10  # not the 30 s bound: the message ended the wait


def test_nothing_to_say_is_an_empty_answer_after_the_bound():
    t0 = time.monotonic()
    assert drain(queue.Queue(), [], 0.05) == ([], False)
    assert time.monotonic() - t0 >= 0.05


def test_a_given_first_message_does_not_wait():
    q = queue.Queue()
    t0 = time.monotonic()
    assert drain(q, [{"ev": "placed"}], 30.0) == ([{"ev": "placed"}], False)
    assert time.monotonic() - t0 < 10


def test_the_end_of_the_stream_is_reported_after_what_came_before():
    q = queue.Queue()
    q.put({"ev": "batch_done"})
    q.put(_END)
    q.put({"ev": "never"})  # nothing after the end is delivered
    assert drain(q, [], 5.0) == ([{"ev": "batch_done"}], True)
    assert drain(_ended(), [], 5.0) == ([], True)  # a worker that ended while nobody polled


def _ended() -> queue.Queue:
    q = queue.Queue()
    q.put(_END)
    return q
