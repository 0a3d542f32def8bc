"""A fake pool whose workers answer by themselves, at once: loads succeed, batches write a tiny PNG
per job and finish. For tests that drive a live server with many requests (the API fuzz test)
without running pipelines."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from genserve.storage import LocalResultStore, output_name
from genserve.workers.fake import GIB, FakePool

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def auto_pool(results_root: str):
    def make(devices, on_message, on_exit):
        return AutoPool(devices, on_message, on_exit, LocalResultStore(results_root))
    return make


class AutoPool(FakePool):
    def __init__(self, devices, on_message, on_exit, results: LocalResultStore) -> None:
        super().__init__(devices, on_message, on_exit)
        self.results = results
        self.resident: dict[str, set[str]] = {w: set() for w in self.workers}

    def start(self) -> None:
        super().start()
        loop = asyncio.get_running_loop()
        for w in list(self.workers):
            loop.call_soon(self.ready, w, 8 * GIB)

    def send(self, worker_id: str, msg: dict[str, Any]) -> None:
        if worker_id in self.workers:
            # Answered on the next loop turn, as a real worker would: never inside the runtime's call.
            asyncio.get_running_loop().call_soon(self._answer, worker_id, msg)

    def _answer(self, w: str, msg: dict[str, Any]) -> None:
        op, t = msg["op"], time.time()
        if op == "load":
            self.resident[w].add(msg["model"])
            self.say(w, "loaded", model=msg["model"], cached=False, load_start=t, load_end=t, bytes=1 << 20,
                     tier="disk")
        elif op == "unload":
            self.resident[w].discard(msg["model"])
            self.say(w, "unloaded", model=msg["model"], used_bytes=len(self.resident[w]) << 20,
                     resident=sorted(self.resident[w]))
        elif op == "run":
            self.say(w, "started", batch_id=msg["batch_id"], t=t)
            for job in msg["jobs"]:
                ref = self.results.put(job["id"], output_name(msg["kind"]), PNG, "image/png").to_dict()
                self.say(w, "job_done", batch_id=msg["batch_id"], job_id=job["id"], result=ref, inference_start=t,
                         inference_end=t, output_written=t)
            self.say(w, "batch_done", batch_id=msg["batch_id"], t=t, peak_bytes=1 << 20)
        elif op == "cancel":
            pass  # batches end at once: a cancel always arrives too late
