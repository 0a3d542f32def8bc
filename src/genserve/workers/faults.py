"""Fault injection inside a worker process, for recovery drills with real processes.

Off unless the config has a ``[faults]`` table *and* ``$GENSERVE_ENABLE_FAULTS=1`` (see config/load.py);
the pool hands each worker process only the faults meant for it. The faults go through the same
paths real failures take: an OutOfMemoryError raised by the batch, SIGKILL of the process, a step
that never returns, a load that raises.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from typing import Any


def _oom_error(message: str) -> Exception:
    try:
        import torch

        return torch.OutOfMemoryError(message)
    except (ImportError, AttributeError):  # older torch: the classifier goes by the name
        return type("OutOfMemoryError", (RuntimeError,), {})(message)


class FaultInjector:
    def __init__(self, spec: dict[str, Any] | None) -> None:
        self.spec = spec or {}
        self.batches = 0  # batches this process has started

    def on_load(self, model: str) -> None:
        if model in self.spec.get("fail_load", ()):
            raise RuntimeError(f"injected fault: loading {model} fails")

    def on_batch(self, size: int, prompts: Sequence[str] = ()) -> None:
        self.batches += 1
        marker = self.spec.get("fail_prompt")
        if marker and any(marker in p for p in prompts):
            # What a tokenizer does with an input it cannot take: the whole pipeline call fails.
            raise TypeError("injected fault: TextEncodeInput must be Union[TextInputSequence, ...]")
        limit = self.spec.get("oom_above_batch", 0)
        if limit and size > limit:
            raise _oom_error(f"injected fault: out of memory for a batch of {size} (limit {limit})")

    def on_step(self, step: int) -> None:
        """Called at the end of each denoising step (0-based), in the pipeline's callback."""
        if step != 0:
            return
        if self.spec.get("crash_on_batch") == self.batches:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-batch, no chance to clean up: a real crash
        if self.spec.get("hang_on_batch") == self.batches:
            while True:  # stuck inside a step: cancels cannot reach it, only a kill ends it
                time.sleep(3600)
