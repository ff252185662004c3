"""Learning-rate factors as pure functions of the number of optimizer updates done."""

from __future__ import annotations

import math


def lr_factor(kind: str, updates_done: int, total: int, warmup: int = 0, num_cycles: float = 0.5) -> float:
    """The factor applied to each group's base lr for the next update.

    cosine: max(0, ½(1 + cos(2π·num_cycles·progress))), progress = (k − warmup)/(total − warmup);
    the seed's num_cycles 0.375 ends near 0.146 instead of 0. Warmup is linear from 0.
    """
    if updates_done < warmup:
        return updates_done / max(1, warmup)
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = (updates_done - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress)))
    raise ValueError(f"unknown lr scheduler {kind!r}")
