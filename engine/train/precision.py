"""Which dtypes a run computes in: the frozen weights', the forward pass's autocast, the saved file's."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


@dataclass(frozen=True)
class Precision:
    """Frozen weights' dtype and the autocast used for the forward pass."""

    weights: torch.dtype
    autocast: torch.dtype | None

    @classmethod
    def for_run_settings(cls, mixed_precision: str, device: torch.device) -> "Precision":
        # Mixed precision is a GPU feature; on a CPU bf16 is slow and gains nothing.
        if device.type != "cuda" or mixed_precision == "no":
            return cls(torch.float32, None)
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        return cls(dtype, dtype)

    def context(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
        return torch.amp.GradScaler(device.type) if self.autocast == torch.float16 else None
