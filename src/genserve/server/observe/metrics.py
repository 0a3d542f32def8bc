"""Prometheus metrics (``GET /metrics``): event metrics updated by the observer as things happen,
and state gauges read from the runtime at scrape time.

Every label set is bounded: models come from the config, workers and device types from the pool,
statuses, stages, tiers and error codes from small fixed vocabularies. No job or batch ids.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STAGES = ("queue_wait", "cold_start", "inference", "output_write")
TIERS = ("disk", "host", "page_cache")  # where a cold start loaded weights from

# Every metric family genserve exposes (counters without their ``_total`` suffix): the docs, the
# Grafana dashboard test and the /metrics test check against this list.
METRIC_NAMES = (
    "genserve_queue_depth", "genserve_job_latency_seconds", "genserve_job_stage_seconds", "genserve_batch_size",
    "genserve_jobs", "genserve_retries", "genserve_cold_starts", "genserve_cold_start_seconds",
    "genserve_models_resident", "genserve_device_busy_seconds", "genserve_device_busy_fraction",
    "genserve_gpu_utilization_ratio", "genserve_gpu_memory_used_bytes", "genserve_gpu_memory_total_bytes",
    "genserve_device_seconds", "genserve_cost_usd", "genserve_idle_cost_usd", "genserve_workers",
    # retention (server/jobs/sweeper.py)
    "genserve_result_bytes_stored", "genserve_result_bytes_deleted", "genserve_jobs_deleted",
    # speed levers (docs/performance.md)
    "genserve_prompt_cache", "genserve_step_cache_steps", "genserve_compiles",
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # the *_created series double the output and no dashboard uses them
        r = self.registry = registry or CollectorRegistry()
        self.latency = Histogram("genserve_job_latency_seconds", "End-to-end latency of succeeded jobs (received to finished)",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("genserve_job_stage_seconds", "Time succeeded jobs spent in each stage",
                               ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("genserve_batch_size", "Jobs per dispatched batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.jobs = Counter("genserve_jobs", "Jobs by final status and error code (code=none when none)",
                            ["model", "status", "code"], registry=r)
        self.retries = Counter("genserve_retries", "Jobs sent back to the queue for another attempt",
                               ["model", "reason"], registry=r)
        self.cold_starts = Counter("genserve_cold_starts", "Model loads a batch had to wait for", ["model", "tier"],
                                   registry=r)
        self.cold_start_seconds = Histogram("genserve_cold_start_seconds", "Duration of model loads", ["model", "tier"],
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.device_seconds = Counter("genserve_device_seconds", "Device time charged to jobs (their batches' share)",
                                      ["model", "device_type"], registry=r)
        self.cost = Counter("genserve_cost_usd", "Cost charged to jobs: device-seconds × price", ["model", "device_type"],
                            registry=r)
        # The speed levers (docs/performance.md), from each succeeded job's ``execution``.
        self.prompt_cache = Counter("genserve_prompt_cache", "Jobs whose prompt embeddings came from the worker's "
                                    "cache (result=hit) or were encoded (miss)", ["model", "result"], registry=r)
        self.cache_steps = Counter("genserve_step_cache_steps", "Denoising steps of jobs with a step cache: "
                                   "computed in full or reused", ["model", "method", "kind"], registry=r)
        self.compiles = Counter("genserve_compiles", "torch.compile graph compilations on workers (at load: "
                                "when=load; later: when=recompile, each a stall)", ["model", "when"], registry=r)
        self.lora_loads = Counter("genserve_lora_loads", "LoRA adapter loads by the tier they came from (storage: the "
                                  "result store; host: host RAM)", ["tier"], registry=r)
        self.lora_hits = Counter("genserve_lora_hits", "LoRA adapters a job found resident on its worker", registry=r)


@dataclass
class Snapshot:
    """What the scrape-time gauges show; built by the observer from the runtime's state."""

    queue_depth: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, device type or "any")
    models_resident: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, device type) -> workers
    workers: dict[str, int] = field(default_factory=dict)  # state -> count
    busy_s: dict[tuple[str, str], float] = field(default_factory=dict)  # (worker, device type), since start
    busy_fraction: dict[tuple[str, str], float] = field(default_factory=dict)  # over the last minute
    idle_cost: dict[tuple[str, str], float] = field(default_factory=dict)  # (device type, warm|empty) -> US$
    gpu: dict[str, dict[str, float]] = field(default_factory=dict)  # worker -> {utilization, memory_used, memory_total}
    running_jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (worker, model) -> jobs in its batch
    lora_resident_bytes: dict[tuple[str], int] = field(default_factory=dict)  # (worker,) -> LoRA adapter bytes held


class StateCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable:
        s = self.snapshot()
        yield _gauge("genserve_queue_depth", "Jobs waiting: in the engine's queues (device_type=any) or on a device "
                     "for a model load", ["model", "device_type"], s.queue_depth)
        yield _gauge("genserve_models_resident", "Workers holding each model", ["model", "device_type"], s.models_resident)
        yield _gauge("genserve_workers", "Worker processes by state", ["state"], {(k,): v for k, v in s.workers.items()})
        yield _gauge("genserve_running_jobs", "Jobs in the batch running on each worker (step-level batching: the "
                     "running set's size, which grows and shrinks at step boundaries)", ["worker", "model"], s.running_jobs)
        yield _gauge("genserve_lora_resident_bytes", "LoRA adapter bytes each worker holds", ["worker"],
                     s.lora_resident_bytes)
        busy = CounterMetricFamily("genserve_device_busy_seconds", "Time a batch held the device", labels=["worker", "device_type"])
        for k, v in sorted(s.busy_s.items()):
            busy.add_metric(list(k), v)
        yield busy
        yield _gauge("genserve_device_busy_fraction", "Share of the last 60 s a batch held the device",
                     ["worker", "device_type"], s.busy_fraction)
        idle = CounterMetricFamily("genserve_idle_cost_usd", "Cost of up devices while no batch ran: warm (a model "
                                   "resident) or empty", labels=["device_type", "kind"])
        for k, v in sorted(s.idle_cost.items()):
            idle.add_metric(list(k), v)
        yield idle
        for key, name, help_ in (("utilization", "genserve_gpu_utilization_ratio", "NVML GPU utilization (0-1)"),
                                 ("memory_used", "genserve_gpu_memory_used_bytes", "NVML GPU memory used"),
                                 ("memory_total", "genserve_gpu_memory_total_bytes", "NVML GPU memory total")):
            yield _gauge(name, help_, ["worker"], {(w, ): g[key] for w, g in s.gpu.items() if key in g})


def _gauge(name: str, help_: str, labels: list[str], values: dict[tuple[str, ...], float]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_, labels=labels)
    for k, v in sorted(values.items()):
        g.add_metric(list(k), v)
    return g


def nvml_stats(devices: dict[str, str]) -> dict[str, dict[str, float]]:
    """GPU utilization and memory per ``cuda:N`` worker, from NVML when ``pynvml`` is installed and
    a driver answers; ``{}`` otherwise (CPU machines, no NVML)."""
    cuda = {w: int(d.split(":", 1)[1]) for w, d in devices.items() if d.startswith("cuda:")}
    if not cuda:
        return {}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return {}
    out: dict[str, dict[str, float]] = {}
    for w, idx in cuda.items():
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(idx)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out[w] = {"utilization": util.gpu / 100.0, "memory_used": float(mem.used), "memory_total": float(mem.total)}
        except Exception:
            continue
    return out
