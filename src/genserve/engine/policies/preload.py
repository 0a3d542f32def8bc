"""Predictive preloading: learn which model tends to follow which, and each model's arrival rate."""
from __future__ import annotations

import math


class TransitionPredictor:
    """Decayed transition counts ``prev model -> next model`` over the request stream, plus an
    exponentially weighted arrival rate per model. Old behaviour fades: each observation multiplies
    the previous counts out of the same model by ``decay``."""

    name = "transitions"

    def __init__(self, decay: float = 0.97, rate_halflife_s: float = 300.0) -> None:
        self.decay = decay
        self.rate_tau = rate_halflife_s / math.log(2)
        self.counts: dict[str, dict[str, float]] = {}
        self.last_model: str | None = None
        self._rate: dict[str, tuple[float, float]] = {}  # model -> (rate estimate, at time)

    def observe(self, model: str, now: float) -> None:
        if self.last_model is not None:
            row = self.counts.setdefault(self.last_model, {})
            for k in row:
                row[k] *= self.decay
            row[model] = row.get(model, 0.0) + 1.0
        self.last_model = model
        rate, at = self._rate.get(model, (0.0, now))
        self._rate[model] = (self._decayed(rate, now - at) + 1.0 / self.rate_tau, now)

    def _decayed(self, rate: float, dt: float) -> float:
        return rate * math.exp(-max(0.0, dt) / self.rate_tau)

    def rate(self, model: str, now: float) -> float:
        """Requests per second, exponentially weighted."""
        rate, at = self._rate.get(model, (0.0, now))
        return self._decayed(rate, now - at)

    def next_probabilities(self, now: float) -> dict[str, float]:
        """P(next request is for m): from transitions out of the last model when there are any,
        otherwise from the arrival rates."""
        row = self.counts.get(self.last_model or "", {})
        total = sum(row.values())
        if total > 0:
            return {m: c / total for m, c in row.items()}
        rates = {m: self.rate(m, now) for m in self._rate}
        total = sum(rates.values())
        return {m: r / total for m, r in rates.items()} if total > 0 else {}
