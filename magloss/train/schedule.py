"""The learning-rate schedule of the training command: warm-up, then cosine or step decay."""

from __future__ import annotations

import math
from typing import Sequence


class Schedule:
    """Learning rate as a function of the epochs done ``t`` (a fraction).

    Linear warm-up ``lr·t/w`` for ``t < w``; then cosine ``lr·(1 + cos(π(t − w)/(E − w)))/2``
    or step ``lr·gamma^(number of milestones ≤ t)``. The rate of a step is taken at the
    epochs done *after* it (so the first step's rate is not 0).
    """

    def __init__(self, kind: str, lr: float, epochs: float, warmup: float, milestones: Sequence[float], gamma: float):
        self.kind, self.base, self.epochs, self.warmup = kind, float(lr), float(epochs), float(warmup)
        self.milestones, self.gamma = [float(m) for m in milestones], float(gamma)

    def __call__(self, t: float) -> float:
        if t < self.warmup:
            return self.base * t / self.warmup
        if self.kind == "cosine":
            u = min(1.0, (t - self.warmup) / (self.epochs - self.warmup))
            return self.base * 0.5 * (1.0 + math.cos(math.pi * u))
        return self.base * self.gamma ** sum(1 for m in self.milestones if m <= t)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "lr": self.base, "epochs": self.epochs, "warmup": self.warmup,
                "milestones": self.milestones, "gamma": self.gamma}
