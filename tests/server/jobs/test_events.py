"""The in-memory SSE hub: per-job ids, history for late subscribers, live queues, bounded memory."""
import asyncio

from genserve.server.jobs.events import EventHub
from genserve.server.status import is_terminal


def test_ids_increase_per_job_from_one():
    hub = EventHub()
    hub.emit("a", "queued", {"model": "m"})
    hub.emit("b", "queued", {"model": "m"})
    hub.emit("a", "started", {})
    hub.emit("a", "progress", {"step": 1})
    assert [(e["id"], e["event"]) for e in hub.history["a"]] == [(1, "queued"), (2, "started"), (3, "progress")]
    assert [(e["id"], e["event"], e["data"]) for e in hub.history["b"]] == [(1, "queued", {"model": "m"})]


def test_known():
    hub = EventHub()
    assert not hub.known("a")
    hub.emit("a", "queued", {})
    assert hub.known("a") and not hub.known("b")
    hub.subscribe("b")  # subscribing alone does not make a job known
    assert not hub.known("b")


def test_late_subscriber_gets_history_then_live_events():
    async def main():
        hub = EventHub()
        hub.emit("j", "queued", {"model": "m"})
        hub.emit("j", "started", {"worker": "w0"})
        history, q = hub.subscribe("j")
        assert [(e["id"], e["event"]) for e in history] == [(1, "queued"), (2, "started")]
        assert q.empty()  # history is not replayed into the queue
        hub.emit("j", "progress", {"step": 1, "total": 2})
        assert q.get_nowait() == {"id": 3, "event": "progress", "data": {"step": 1, "total": 2}}
        # the returned history is a snapshot: later events do not change it
        assert len(history) == 2
        hub.emit("other", "queued", {})  # another job's events do not reach this queue
        assert q.empty()

    asyncio.run(main())


def test_waiting_consumer_is_woken_by_emit():
    async def main():
        hub = EventHub()
        history, q = hub.subscribe("j")
        assert history == []

        async def consume():
            got = []
            while True:
                ev = await q.get()
                got.append(ev)
                if is_terminal(ev["event"]):
                    return got

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)  # the consumer is now blocked in q.get()
        for event in ("queued", "started", "succeeded"):
            hub.emit("j", event, {})
            await asyncio.sleep(0)
        got = await asyncio.wait_for(task, timeout=5)
        assert [(e["id"], e["event"]) for e in got] == [(1, "queued"), (2, "started"), (3, "succeeded")]

    asyncio.run(main())


def test_every_subscriber_gets_each_event_and_unsubscribe_stops_delivery():
    async def main():
        hub = EventHub()
        _, q1 = hub.subscribe("j")
        _, q2 = hub.subscribe("j")
        hub.emit("j", "queued", {})
        assert q1.get_nowait()["id"] == 1 and q2.get_nowait()["id"] == 1
        hub.unsubscribe("j", q1)
        hub.emit("j", "started", {})
        assert q1.empty()
        assert q2.get_nowait()["event"] == "started"
        assert hub.subscribers["j"] == {q2}
        hub.unsubscribe("j", q2)
        assert "j" not in hub.subscribers  # the last one leaving removes the entry
        hub.unsubscribe("j", q2)  # twice, or for an unknown job: harmless
        hub.unsubscribe("nope", q2)
        hub.emit("j", "progress", {})
        assert q2.empty()
        assert [e["id"] for e in hub.history["j"]] == [1, 2, 3]  # history keeps everything regardless

    asyncio.run(main())


def test_history_is_bounded_by_max_jobs_oldest_dropped():
    hub = EventHub(max_jobs=3)
    for j in ("a", "b", "c"):
        hub.emit(j, "queued", {})
    hub.emit("a", "started", {})  # more events for a known job never evict anyone
    assert list(hub.history) == ["a", "b", "c"]
    hub.emit("d", "queued", {})
    assert list(hub.history) == ["b", "c", "d"]
    assert not hub.known("a") and hub.known("d")
    hub.emit("e", "queued", {})
    assert list(hub.history) == ["c", "d", "e"]
    assert len(hub.history) == 3
    # an evicted job that emits again starts a fresh history
    hub.emit("a", "progress", {})
    assert [(e["id"], e["event"]) for e in hub.history["a"]] == [(1, "progress")]
    assert list(hub.history) == ["d", "e", "a"]


def test_late_subscriber_of_an_evicted_job_gets_no_history():
    async def main():
        hub = EventHub(max_jobs=1)
        hub.emit("old", "queued", {})
        hub.emit("new", "queued", {})
        history, q = hub.subscribe("old")
        assert history == [] and not hub.known("old")
        hub.emit("old", "succeeded", {})  # live events still reach a subscriber
        assert q.get_nowait()["event"] == "succeeded"

    asyncio.run(main())


def test_the_hub_listens_to_job_events_only():
    from genserve.server.jobs.listeners import Event

    hub = EventHub()
    hub.on_event(Event("queued", 1.0, "j1", {"model": "m"}))
    hub.on_event(Event("batch_dispatched", 1.0, data={"batch_id": "b"}))  # a fleet event: not for SSE
    hub.on_event(Event("synced", 1.0))
    hub.on_event(Event("started", 2.0, "j1", {"worker": "w0"}))
    history, _ = hub.subscribe("j1")
    assert [(e["id"], e["event"]) for e in history] == [(1, "queued"), (2, "started")]
    assert not hub.known("b") and len(hub.history) == 1


def test_a_terminal_event_reaches_subscribers_then_the_history_is_released():
    async def main():
        hub = EventHub()
        _, q = hub.subscribe("j")
        for event in ("queued", "started", "progress", "succeeded"):
            hub.emit("j", event, {})
        assert [q.get_nowait()["event"] for _ in range(4)] == ["queued", "started", "progress", "succeeded"]
        assert not hub.known("j") and hub.history == {}
        hub.unsubscribe("j", q)
        assert hub.subscribers == {}

    asyncio.run(main())


def test_many_jobs_leave_nothing_behind():
    hub = EventHub()
    for i in range(2000):
        for event in ("queued", "started", "progress", "progress", ("succeeded", "failed", "canceled")[i % 3]):
            hub.emit(f"j{i}", event, {"step": 1})
    assert hub.history == {} and hub.subscribers == {}


def test_close_streams_sends_reconnect_to_open_and_later_subscribers():
    async def main():
        hub = EventHub(retry_ms=1500)
        hub.emit("j", "queued", {})
        _, q = hub.subscribe("j")
        assert hub.close_streams() == 1
        ev = q.get_nowait()
        assert ev["event"] == "reconnect" and ev["id"] is None and ev["data"]["retry_ms"] == 1500
        _, later = hub.subscribe("k")
        assert later.get_nowait()["event"] == "reconnect"

    asyncio.run(main())
