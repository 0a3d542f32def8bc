"""LoRA adapter residency (DESIGN §5: adapters are resident objects like models). The engine's view
of which adapters each worker holds, with their bytes, in least-recently-used order, and what a
batch needs evicted so its adapters fit the worker's ``lora_memory`` — the worker's cache follows
the same rule and is told the evictions (``RunBatch.lora_evict``), so both tables agree; the
worker's report after each batch (``reported``) replaces the engine's guess with measured bytes.

Tiers: an adapter comes from storage (the result store) into host RAM and then the device; the
engine only needs "held by this worker or not" (a miss costs a load), the worker reports the tier
each load came from. Placement asks ``held(worker, ids)``: how many of a batch's adapters a worker
holds already.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

DEFAULT_BYTES = 16 << 20  # an adapter never measured nor hinted: a typical SD rank-16 attention LoRA


class AdapterResidency:
    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity  # bytes per worker; None: unlimited
        self.sizes: dict[str, int] = {}  # adapter id -> bytes (measured, else the registry's hint)
        self.workers: dict[str, OrderedDict[str, int]] = {}  # worker -> {adapter id: bytes}, LRU first
        self.hits = 0  # adapters a batch found resident on its worker
        self.misses = 0  # adapters a batch had to load

    def hint(self, sizes: Mapping[str, int]) -> None:
        for i, n in sizes.items():
            if n > 0:
                self.sizes.setdefault(i, n)

    def size(self, lora_id: str) -> int:
        return self.sizes.get(lora_id, DEFAULT_BYTES)

    def held(self, worker: str, ids: Iterable[str]) -> int:
        table = self.workers.get(worker, {})
        return sum(1 for i in set(ids) if i in table)

    def resident(self, worker: str) -> dict[str, int]:
        return dict(self.workers.get(worker, {}))

    def fits(self, ids: Iterable[str]) -> bool:
        """Could these adapters be resident together on an emptied worker?"""
        return self.capacity is None or sum(self.size(i) for i in set(ids)) <= self.capacity

    def evictions(self, worker: str, ids: Iterable[str]) -> list[str]:
        """Adapters to drop from ``worker`` (least recently used first) so ``ids`` fit beside the
        rest. Never one of ``ids``. When they cannot fit even alone, everything else goes."""
        table = self.workers.get(worker, OrderedDict())
        need = set(ids)
        if self.capacity is None:
            return []
        used = sum(table.values()) + sum(self.size(i) for i in need if i not in table)
        out = []
        for i, n in table.items():
            if used <= self.capacity:
                break
            if i not in need:
                out.append(i)
                used -= n
        return out

    def use(self, worker: str, ids: Iterable[str], evict: Iterable[str]) -> None:
        """A batch on ``worker`` needs ``ids``, after dropping ``evict``: they are resident now,
        most recently used; each one not held before counts as a miss (a load)."""
        table = self.workers.setdefault(worker, OrderedDict())
        for i in evict:
            table.pop(i, None)
        for i in dict.fromkeys(ids):
            if i in table:
                self.hits += 1
                table.move_to_end(i)
            else:
                self.misses += 1
                table[i] = self.size(i)

    def reported(self, worker: str, resident: Mapping[str, int]) -> None:
        """The worker's own table (measured bytes), in its order: it is the truth."""
        table = self.workers.get(worker, OrderedDict())
        order = [i for i in table if i in resident] + [i for i in resident if i not in table]
        self.workers[worker] = OrderedDict((i, int(resident[i])) for i in order)
        for i, n in resident.items():
            self.sizes[i] = int(n)

    def drop_worker(self, worker: str) -> None:
        self.workers.pop(worker, None)
