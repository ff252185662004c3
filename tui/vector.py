"""The block vector being edited: entry 0 and one weight per UNet block of the LoRA.

Entry 0 means two things, and both are shown, never merged: `Chop` reads it as a factor on every
UNet block (the text encoders pass through unchanged), the Block Weight loader (which `Preview`
follows) as BASE, the strength of the text encoders and the UNet keys outside the blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loradrop.errors import UserError

from .formatting import weight_text

ENTRY0_CHOP = "Chop: a factor on every UNet block (text encoders pass through)"
ENTRY0_PREVIEW = "Preview (Block Weight loader): BASE, the text encoders' strength"
STEP = 0.1


def parse_weights(text: str) -> list[float]:
    """Plain numbers, comma-separated (random tokens such as R or U have no fixed value to edit)."""
    values = []
    for i, token in enumerate(text.split(",")):
        try:
            value = float(token)
        except ValueError:
            raise UserError(
                f"entry {i} of the vector ({token.strip()!r}) is not a number; give numbers like 1,0,0.5,…"
            ) from None
        if not math.isfinite(value):
            raise UserError(f"entry {i} of the vector ({token.strip()!r}) is not a finite number.")
        values.append(value)
    return values


@dataclass
class BlockVector:
    labels: list[str]  # "BASE", then the blocks' labels ("INP01", ...)
    weights: list[float] = field(default_factory=list)

    def __post_init__(self):
        if not self.weights:
            self.weights = [1.0] * len(self.labels)
        if len(self.weights) != len(self.labels):
            raise UserError(
                f"the vector has {len(self.weights)} entries, but this LoRA needs {len(self.labels)}: {','.join(['1', *self.labels[1:]])}."
            )

    @classmethod
    def for_blocks(cls, block_labels: list[str], text: str = "") -> "BlockVector":
        """All ones, or `text` when it gives one plain number per entry."""
        labels = ["BASE", *block_labels]
        return cls(labels, parse_weights(text) if text else [])

    def set(self, index: int, value: float) -> None:
        if not math.isfinite(value):
            raise UserError(f"{value} is not a finite number.")
        self.weights[index] = round(value, 4)

    def nudge(self, index: int, delta: float = STEP) -> None:
        self.set(index, self.weights[index] + delta)

    def apply(self, text: str) -> None:
        """Take all weights from a vector string (a preset's, say)."""
        weights = parse_weights(text)
        if len(weights) != len(self.labels):
            raise UserError(f"the vector has {len(weights)} entries, but this LoRA needs {len(self.labels)}.")
        self.weights = weights

    @property
    def text(self) -> str:
        return ",".join(weight_text(w) for w in self.weights)

    @property
    def is_identity(self) -> bool:
        return all(w == 1.0 for w in self.weights)
