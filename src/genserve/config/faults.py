"""``[faults]``: fault injection for recovery drills (tests only)."""
from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError
from .values import _check_table, _int, _type

FAULTS_ENV = "GENSERVE_ENABLE_FAULTS"  # fault injection is refused unless this is "1"


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection for recovery drills (off unless configured *and* $GENSERVE_ENABLE_FAULTS=1).
    Counts are per worker process; ``lives`` processes of each affected worker misbehave, later
    restarts behave (so a drill tests recovery, not an endless crash loop, unless asked to)."""

    oom_above_batch: int = 0  # raise OutOfMemoryError for batches with more jobs than this
    crash_on_batch: int = 0  # SIGKILL itself at the first step of its Nth batch
    hang_on_batch: int = 0  # sleep forever inside the first step of its Nth batch
    fail_load: tuple[str, ...] = ()  # models whose load raises
    fail_prompt: str = ""  # a batch with a job whose prompt contains this raises (an input the pipeline rejects)
    workers: tuple[str, ...] = ()  # worker ids affected (empty: all)
    lives: int = 1

    def for_worker(self, worker_id: str, life: int) -> dict[str, Any] | None:
        """The faults one worker process applies (a plain dict: it crosses a process boundary)."""
        if (self.workers and worker_id not in self.workers) or life >= self.lives:
            return None
        return {"oom_above_batch": self.oom_above_batch, "crash_on_batch": self.crash_on_batch,
                "hang_on_batch": self.hang_on_batch, "fail_load": list(self.fail_load),
                "fail_prompt": self.fail_prompt}



_FAULT_KEYS = {f.name for f in fields(FaultConfig)}


def parse_faults(raw: Any, models: Collection[str]) -> FaultConfig:
    """``[faults]``; ``models``: the configured model names."""
    _type("faults", raw, dict, "a table")
    if os.environ.get(FAULTS_ENV) != "1":
        raise ConfigError("faults", f"fault injection is for tests; refused unless ${FAULTS_ENV}=1")
    _check_table("faults", raw, _FAULT_KEYS)
    kw: dict[str, Any] = {}
    for k in ("oom_above_batch", "crash_on_batch", "hang_on_batch"):
        if k in raw:
            kw[k] = _int(f"faults.{k}", raw[k], 0)
    if "lives" in raw:
        kw["lives"] = _int("faults.lives", raw["lives"], 1)
    if "fail_prompt" in raw:
        kw["fail_prompt"] = _type("faults.fail_prompt", raw["fail_prompt"], str, "a string")
    for k in ("fail_load", "workers"):
        if k in raw:
            _type(f"faults.{k}", raw[k], list, "a list of names")
            kw[k] = tuple(_type(f"faults.{k}[{i}]", v, str, "a string") for i, v in enumerate(raw[k]))
    for i, name in enumerate(kw.get("fail_load", ())):
        if name not in models:
            raise ConfigError(f"faults.fail_load[{i}]", f"unknown model {name!r}")
    return FaultConfig(**kw)
