"""The learning-rate schedule every training loop in busiseg follows (masks and classifier)."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up, then cosine or poly decay to zero (per optimisation step)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "poly":
        return max(0.0, 1 - progress) ** 0.9
    return 1.0
