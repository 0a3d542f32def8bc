"""Tenant-aware admission into a model's queue (issue 22): one tenant cannot lock the others out.

The rule, with ``Q`` the model's ``max_queue``, ``w`` the asking tenant's weight and ``W`` the sum of
the weights of the tenants that want the model (have jobs in its queue), the asking one included:

- **Alone** (no other tenant has a job queued for the model): admitted while the queue holds at most
  ``Q`` jobs — the whole queue is its to use, as before.
- **Shared**: a tenant's share is ``max(1, floor(Q · w / W))`` jobs. It is admitted while its own
  queued jobs stay within its share, **even when the queue already holds Q jobs**: a tenant that
  filled the queue while alone keeps what it has (nothing accepted is ever evicted) but gets no
  more until it is back under its share, and the newcomer gets room at once. The queue may so exceed
  ``Q``, never beyond ``2 · Q`` (a hard ceiling: memory stays bounded however tenants come and go).

So a flooding tenant is refused once it holds its share and another tenant is waiting, and a tenant
under its share is never refused ``queue_full`` while the queue is under ``2 · Q``. Jobs without a
tenant (or every job, with ``[server] fair_share = false``) count as one tenant: the old rule.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from ..types import Admission


def share(max_queue: int, weight: float, active_weight: float) -> int:
    """A tenant's share of a model's queue: ``max(1, floor(Q · w / W))``."""
    return max(1, math.floor(max_queue * weight / active_weight + 1e-9))


def admits(max_queue: int, depth: int, mine: int, weight: float, others_weight: float, n: int = 1) -> bool:
    """May ``n`` more jobs of a tenant join a model's queue? ``depth``: jobs queued for the model;
    ``mine``: the tenant's own; ``others_weight``: the summed weights of the other tenants with jobs
    queued for it (0: the tenant is alone)."""
    if others_weight <= 0:
        return depth + n <= max_queue
    return mine + n <= share(max_queue, weight, weight + others_weight) and depth + n <= 2 * max_queue


ACCEPTED = Admission(True)


def refusal(max_queue: int, depth: int, mine: int, weight: float, others_weight: float, n: int,
            drain_estimate: Callable[[int], float]) -> Admission:
    """The engine's answer when ``admits`` says no, with its Retry-After: ``drain_estimate(k)`` for
    ``k`` jobs to be served first — the tenant's excess over its share (served at ``w / W`` of the
    rate), or the queue's own excess."""
    if others_weight <= 0:
        return Admission(False, "queue_full", drain_estimate(depth))
    cap = share(max_queue, weight, weight + others_weight)
    if mine + n > cap:
        ahead = math.ceil((mine + n - cap) * (weight + others_weight) / weight)
    else:  # the ceiling
        ahead = depth + n - 2 * max_queue
    return Admission(False, "queue_full", drain_estimate(ahead), share=cap)
