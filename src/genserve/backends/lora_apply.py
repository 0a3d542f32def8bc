"""LoRA adapters in a worker: loaded from the result store into host RAM (then the device), kept in
an LRU within the worker's adapter budget, and applied *per row* of a denoiser call, so jobs with
different adapters (or none) share one call.

How: each targeted ``nn.Linear`` of the denoiser gets a forward hook (the module itself, its
weights and its state-dict names are untouched: changing adapters never reloads or edits the base
model). For a call, a plan holds per job the concatenation of its adapters' A matrices
(``R x in``) and B matrices (``out x R``, pre-scaled by ``scale * alpha / rank``), zero-padded to
the batch's largest total rank R; the hook adds ``B_row(A_row(x_row))`` to each row with two
batched matmuls. Rows map to jobs as the pipelines lay them out: ``row % jobs`` for request-level
calls (classifier-free guidance concatenates [uncond, cond] or runs a second call), or an explicit
row -> job map (the step runner's slot-by-slot rows). Rows of jobs without adapters are skipped.

The output of a job therefore depends only on its own adapters: every other operation of the
denoiser is per row already (what makes request batching exact), and the hook is per row too.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..storage import ResultStore
from .lora_file import read_adapter

STORE_DIR = "loras"  # server/jobs/loras.py keeps each adapter's file at loras/<id>.safetensors


def denoiser(pipe: Any) -> Any:
    return getattr(pipe, "unet", None) if getattr(pipe, "unet", None) is not None else pipe.transformer


@dataclass
class Adapter:
    id: str
    bytes: int
    layers: dict[str, tuple[Any, Any, float]]  # module -> (A: rank x in, B: out x rank, alpha / rank)
    device: str = "cpu"


def load_adapter(lora_id: str, data: bytes, modules: dict[str, tuple[int, int]] | None = None) -> Adapter:
    """Parse (header by hand, no pickle) and read the tensors of one adapter file into host RAM.
    ``modules``: the denoiser's linear layers (resolves kohya names, checks shapes again)."""
    import torch
    from safetensors.torch import load

    info = read_adapter(data, modules)
    tensors = load(data)
    layers = {}
    for layer in info.layers:
        alpha = float(tensors[layer.alpha].reshape(-1)[0]) if layer.alpha else float(layer.rank)
        layers[layer.module] = (tensors[layer.down].to(torch.float32), tensors[layer.up].to(torch.float32),
                                alpha / layer.rank)
    return Adapter(lora_id, sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                                for a, b, _ in layers.values()), layers)


class AdapterCache:
    """The worker's adapters, least recently used first. ``get`` reports where each came from:
    ``device`` (resident), ``host`` (in RAM, moved to the device now) or ``storage`` (read from
    the result store). Beyond ``budget`` bytes the least recently used go, except those pinned
    by the batch being prepared. The engine mirrors this table (docs/lora.md) and may also name
    adapters to drop (``evict``)."""

    def __init__(self, store: ResultStore, device: str, budget: int) -> None:
        self.store, self.device, self.budget = store, device, budget
        self.adapters: OrderedDict[str, Adapter] = OrderedDict()
        self.loads = {"storage": 0, "host": 0}
        self.hits = 0

    def resident(self) -> dict[str, int]:
        return {i: a.bytes for i, a in self.adapters.items()}

    def evict(self, ids: Sequence[str]) -> None:
        for i in ids:
            self.adapters.pop(i, None)

    def get(self, lora_id: str, keep: set[str] = frozenset(),
            modules: dict[str, tuple[int, int]] | None = None) -> tuple[Adapter, str]:
        a = self.adapters.get(lora_id)
        if a is not None:
            self.adapters.move_to_end(lora_id)
            self.hits += 1
            return a, "device"
        a = load_adapter(lora_id, self.store.read(f"{STORE_DIR}/{lora_id}.safetensors"), modules)
        tier = "storage"
        if self.device != "cpu":
            a.layers = {m: (x.to(self.device), y.to(self.device), f) for m, (x, y, f) in a.layers.items()}
            a.device = self.device
        self.loads[tier] += 1
        self.adapters[lora_id] = a
        used = sum(x.bytes for x in self.adapters.values())
        for old in list(self.adapters):
            if used <= self.budget:
                break
            if old != lora_id and old not in keep:
                used -= self.adapters.pop(old).bytes
        return a, tier


JobLoras = Sequence[tuple[Adapter, float]]  # one job's adapters with their scales


class LoraHooks:
    """Per-row LoRA on one pipeline's denoiser: hooks installed once per targeted module, a plan
    set for the duration of a denoiser call (``plan``). With no plan the hooks return at once."""

    def __init__(self, pipe: Any) -> None:
        import torch

        self.model = denoiser(pipe)
        self.modules = dict(self.model.named_modules())
        self.table = {n: tuple(m.weight.shape) for n, m in self.modules.items() if isinstance(m, torch.nn.Linear)}
        self.hooked: set[str] = set()
        self._plan: dict[str, tuple[Any, Any]] | None = None  # set only during a planned call
        self._built: dict[str, tuple[Any, Any]] = {}
        self._rows: Any = None  # row -> job index (None: row % jobs)
        self._active: Any = None  # job indices with adapters (None: all)
        self._jobs = 0
        self._key: tuple | None = None

    def _hook(self, name: str):
        def hook(_module, inputs, output):
            plan = self._plan
            if plan is None or name not in plan:
                return None
            return output + self._delta(inputs[0], plan[name], output.shape)
        return hook

    def _delta(self, x, ab, shape):
        import torch

        a, b = ab  # jobs x R x in, jobs x out x R
        rows = x.shape[0]
        if self._rows is not None:
            idx = self._rows
        else:
            if rows % self._jobs:
                raise RuntimeError(f"a denoiser call of {rows} rows for {self._jobs} jobs: rows cannot be mapped "
                                   "to jobs (this family needs lora_batching = \"split\")")
            idx = torch.arange(rows, device=x.device) % self._jobs
        x3 = x.reshape(rows, -1, x.shape[-1])
        if self._active is not None:  # only rows whose job has adapters
            sel = torch.isin(idx, self._active).nonzero().flatten()
            d = torch.bmm(torch.bmm(x3[sel], a[idx[sel]].transpose(1, 2)), b[idx[sel]].transpose(1, 2))
            out = torch.zeros((rows, x3.shape[1], d.shape[-1]), dtype=d.dtype, device=d.device)
            out[sel] = d
            return out.reshape(shape)
        return torch.bmm(torch.bmm(x3, a[idx].transpose(1, 2)), b[idx].transpose(1, 2)).reshape(shape)

    def install(self, modules: set[str]) -> None:
        import torch

        for name in modules - self.hooked:
            mod = self.modules.get(name)
            if not isinstance(mod, torch.nn.Linear):
                raise ValueError(f"{name}: not a linear layer of this pipeline's denoiser")
            mod.register_forward_hook(self._hook(name))
            self.hooked.add(name)

    @contextmanager
    def plan(self, jobs: Sequence[JobLoras], rows: Sequence[int] | None = None) -> Iterator[None]:
        """Apply ``jobs[i]``'s adapters to job i's rows during the block. ``rows``: the job index of
        each row (default ``row % len(jobs)``)."""
        if not any(jobs):
            yield
            return
        import torch

        key = (tuple(tuple((a.id, s) for a, s in j) for j in jobs), tuple(rows) if rows is not None else None)
        if key != self._key:  # the same composition (a step-level set between joins) reuses its plan
            self.install({m for j in jobs for a, _ in j for m in a.layers})
            self._built = self._build(jobs)
            self._jobs = len(jobs)
            dev = next(iter(self._built.values()))[0].device
            self._rows = torch.as_tensor(list(rows), device=dev) if rows is not None else None
            active = [i for i, j in enumerate(jobs) if j]
            self._active = None if len(active) == len(jobs) else torch.as_tensor(active, device=dev)
            self._key = key
        self._plan = self._built
        try:
            yield
        finally:
            self._plan = None

    def _build(self, jobs: Sequence[JobLoras]) -> dict[str, tuple[Any, Any]]:
        import torch

        out = {}
        for name in {m for j in jobs for a, _ in j for m in a.layers}:
            weight = self.modules[name].weight
            parts = [[(a.layers[name], s) for a, s in j if name in a.layers] for j in jobs]
            r = max((sum(ab[0].shape[0] for ab, _ in p) for p in parts), default=0)
            n_out, n_in = weight.shape
            A = torch.zeros((len(jobs), r, n_in), dtype=weight.dtype, device=weight.device)
            B = torch.zeros((len(jobs), n_out, r), dtype=weight.dtype, device=weight.device)
            for i, p in enumerate(parts):
                k = 0
                for (a, b, factor), scale in p:
                    A[i, k:k + a.shape[0]] = a.to(weight.device, weight.dtype)
                    B[i, :, k:k + a.shape[0]] = (b * (scale * factor)).to(weight.device, weight.dtype)
                    k += a.shape[0]
            out[name] = (A, B)
        return out


class LoraRuntime:
    """What a ``PipelineRunner`` keeps for adapters: the cache and each pipeline's hooks."""

    def __init__(self, store: ResultStore, device: str, budget: int) -> None:
        self.cache = AdapterCache(store, device, budget)
        self.hooks: dict[int, LoraHooks] = {}

    def configure(self, msg: dict[str, Any]) -> None:
        """A run message's adapter settings: the budget (``lora_memory``) and the engine's evictions."""
        if msg.get("lora_memory"):
            self.cache.budget = int(msg["lora_memory"])
        self.cache.evict(msg.get("lora_evict") or ())

    def hooks_for(self, pipe: Any) -> LoraHooks:
        h = self.hooks.get(id(pipe))
        if h is None or h.model is not denoiser(pipe):
            h = self.hooks[id(pipe)] = LoraHooks(pipe)
        return h

    def adapters_of(self, pipe: Any, jobs: Sequence[dict[str, Any]],
                    timings: dict[str, dict[str, Any]]) -> list[JobLoras]:
        """Each job's adapters, loaded as needed; ``timings[job id]``: its ``lora_load_s`` and the
        tiers its adapters came from (``device`` = already resident: a hit)."""
        keep = {a["id"] for j in jobs for a in j.get("loras") or ()}
        table = self.hooks_for(pipe).table
        out = []
        for j in jobs:
            mine = []
            t0, tiers = time.perf_counter(), []
            for a in j.get("loras") or ():
                adapter, tier = self.cache.get(a["id"], keep, table)
                mine.append((adapter, float(a["scale"])))
                tiers.append(tier)
            if tiers:
                timings[j["id"]] = {"lora_load_s": time.perf_counter() - t0, "lora_tiers": tiers}
            out.append(mine)
        return out
