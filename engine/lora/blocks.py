"""UNet blocks of a LoRA: the layout chop_blocks prints, block vectors, and where ΔW's energy sits.

Layout (chop_blocks' grouping): keys `lora_unet_(input_blocks|middle_block|output_blocks)_<j>_…`
form the blocks (section, j), in the order input → middle → output, by j; every other key (both
text encoders, UNet keys outside those blocks) passes through. A block's size counts tensors,
so each module adds three (alpha, down, up).

A block vector has one entry before the blocks, and its meaning depends on the tool:
- chop: entry 0 is a global factor for the UNet blocks; the text encoders always pass through.
- the Inspire "Lora Loader (Block Weight)" node (previews here): entry 0 is BASE, the strength of
  the text encoders and non-block UNet keys.
Both tools read the remaining entries as one weight per block present in the file.

The layout, the vector parser and the presets import no torch: the daemon's server uses them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from loradrop.errors import UserError

_BLOCK = re.compile(r"lora_unet_((input|middle|output)_blocks?)_(\d+)_")
_SHORT = {"input_blocks": "INP", "middle_block": "MID", "output_blocks": "OUT"}
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")

ENTRY0_CHOP = "chop reads entry 0 as a global factor on every UNet block (text encoders always pass through)"
ENTRY0_LOADER = "the Block Weight loader reads entry 0 as BASE, the text encoders' strength"

_ONES_21, _ZEROS_21 = ",".join(["1"] * 21), ",".join(["0"] * 21)
# The Inspire Pack's SDXL presets: 21 entries for a LyCORIS LoCon (BASE + 20 blocks), 12 for an
# attention-only LoRA (BASE, IN04 IN05 IN07 IN08, MID, OUT00-OUT05).
PRESETS: dict[str, str] = {
    "SDXL-LyC-NONE": _ZEROS_21,
    "SDXL-LyC-ALL": _ONES_21,
    "SDXL-LyC-INALL": "1," + ",".join(["1"] * 8 + ["0"] * 12),
    "SDXL-LyC-MIDALL": "1," + ",".join(["0"] * 8 + ["1"] * 3 + ["0"] * 9),
    "SDXL-LyC-OUTALL": "1," + ",".join(["0"] * 11 + ["1"] * 9),
    "SDXL-NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "SDXL-ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "SDXL-INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "SDXL-MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",
    "SDXL-OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
}


# ------------------------------------------------------------------ layout


def module_of(key: str) -> str:
    return key.split(".", 1)[0]


def block_key(key: str) -> tuple[str, int] | None:
    """(section, j) of a UNet block key, None for a pass-through key."""
    m = _BLOCK.match(key)
    return (m.group(1), int(m.group(3))) if m else None


@dataclass(frozen=True)
class Block:
    section: str  # input_blocks, middle_block or output_blocks
    index: int
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.section}.{self.index}"

    @property
    def short(self) -> str:
        return f"{_SHORT.get(self.section, self.section[:3].upper())}{self.index:02d}"

    @property
    def modules(self) -> list[str]:
        return sorted({module_of(k) for k in self.keys})


@dataclass(frozen=True)
class Layout:
    blocks: tuple[Block, ...]
    passthrough: tuple[str, ...]

    @property
    def vector_string(self) -> str:
        return ",".join(["1"] + [b.short for b in self.blocks])

    def index_of(self, module: str) -> int | None:
        """The position of a module's block in `blocks`, None for a pass-through module."""
        where = block_key(module + ".")
        for i, b in enumerate(self.blocks):
            if (b.section, b.index) == where:
                return i
        return None

    def block_line(self, i: int) -> str:
        """chop_blocks' line for block i (its log's tab shown as two spaces)."""
        b = self.blocks[i]
        return f"  [{i:>2d}] {b.section:>13}.{b.index} layers={len(b.keys):<3}"

    def lines(self, weights: Sequence[float] | None = None) -> list[str]:
        """chop_blocks' printout; with the per-block weights chop will use, when given."""
        out = ["Blocks layout:"]
        for i in range(len(self.blocks)):
            line = self.block_line(i)
            if weights is not None:
                w = weights[i]
                line += " (removed)" if abs(w) < 1e-6 else f" weight={format_weight(w)}"
            out.append(line.rstrip())
        out.append(f'Vector string : "{self.vector_string}"')
        out.append(f"Pass through layers: {len(self.passthrough)}")
        return out


def layout(keys: Iterable[str]) -> Layout:
    groups: dict[tuple[str, int], list[str]] = {}
    passthrough = []
    for k in keys:
        where = block_key(k)
        if where is None:
            passthrough.append(k)
        else:
            groups.setdefault(where, []).append(k)
    blocks = tuple(Block(s, j, tuple(sorted(ks))) for (s, j), ks in sorted(groups.items()))
    return Layout(blocks, tuple(sorted(passthrough)))


def format_weight(w: float) -> str:
    return f"{w:g}"


# ------------------------------------------------------------------ vectors


class VectorLengthError(UserError):
    """A vector that does not fit the file's blocks; carries the layout so a CLI can print it."""

    def __init__(self, message: str, layout: Layout):
        super().__init__(message)
        self.layout = layout


def vector_tokens(text: str) -> list[str]:
    """The entries of a vector given as numbers, a preset name, or `NAME:vector` (as Inspire)."""
    text = text.strip()
    if text in PRESETS:
        text = PRESETS[text]
    elif ":" in text:
        text = text.split(":", 2)[1].strip()
    tokens = [t.strip() for t in text.split(",")]
    if tokens == [""]:
        raise UserError(
            "The block vector is empty; give numbers like 1,0,1,… or a preset name such as SDXL-LyC-ALL."
        )
    if len(tokens) == 1 and not _is_token(tokens[0]):
        raise UserError(f"'{text}' is neither a block vector nor a preset; presets: {', '.join(PRESETS)}.")
    for i, t in enumerate(tokens):
        if not t:
            raise UserError(f"Entry {i} of the block vector '{text}' is empty.")
        if " " in t:
            raise UserError(
                f"Entry {i} of the block vector ('{t}') holds several values; per-layer sub-vectors are not supported, give one value per block."
            )
        if not _is_token(t):
            raise UserError(
                f"Entry {i} of the block vector ('{t}') is not a number nor one of R, U, A, a, B, b."
            )
    return tokens


def _is_token(t: str) -> bool:
    return t in ("R", "r", "U", "u", "A", "a", "B", "b") or _NUMBER.fullmatch(t) is not None


def parse_vector(
    text: str, n_blocks: int | None = None, *, seed: int = 0, a: float = 4.0, b: float = 1.0
) -> list[float]:
    """Resolve a block vector to numbers, as the Inspire loader does.

    R is random in [0, 3), U random in [-1.5, 1.5) (both rounded to 2 decimals), A and B the given
    values, a and b their halves. Random draws come from numpy's legacy generator seeded with
    `seed`, in the loader's order: blocks first (only the first `n_blocks` entries after entry 0
    are drawn), entry 0 last, so a seed gives the same weights as in ComfyUI.
    """
    tokens = vector_tokens(text)
    rng = None

    def value(t: str) -> float:
        nonlocal rng
        if t in ("R", "r", "U", "u"):
            import numpy as np  # only random tokens need it; the client install has no numpy

            if rng is None:
                rng = np.random.RandomState(seed % 2**31)
            low, high = (0.0, 3.0) if t in ("R", "r") else (-1.5, 1.5)
            return float(np.round(rng.uniform(low, high), 2))
        fixed = {"A": a, "a": a / 2, "B": b, "b": b / 2}
        if t in fixed:
            return float(fixed[t])
        v = float(t)
        if not math.isfinite(v):
            raise UserError(f"Block vector entry '{t}' is not a finite number.")
        return v

    last = len(tokens) if n_blocks is None else min(len(tokens), n_blocks + 1)
    values: list[float | None] = [None] * len(tokens)
    for i in [*range(1, last), 0]:
        values[i] = value(tokens[i])
    return [value(t) if v is None else v for t, v in zip(tokens, values)]


def is_plain_numbers(text: str) -> bool:
    return all(_NUMBER.fullmatch(t.strip()) for t in text.split(","))


def check_length(vector: Sequence[float], lay: Layout, path) -> None:
    """chop needs exactly one entry per block after entry 0."""
    need = len(lay.blocks) + 1
    if len(vector) != need:
        raise VectorLengthError(
            f"{path} has {len(lay.blocks)} UNet blocks, so the vector needs {need} entries (entry 0, then one per "
            f"block: {lay.vector_string}); got {len(vector)}.",
            lay,
        )


# ------------------------------------------------------------------ energy


@dataclass
class BlockEnergy:
    name: str
    short: str
    tensors: int
    energy: float  # Σ ‖ΔW‖_F over the block's modules
    relative: float | None  # Σ ‖ΔW‖_F / ‖W‖_F, with a base model
    share: float = 0.0  # of the blocks' total (relative when a base is given)


@dataclass
class EnergyReport:
    layout: Layout
    blocks: list[BlockEnergy]
    passthrough: BlockEnergy  # the text encoders and non-block UNet modules together
    no_base: list[str]  # modules the base lacks (their relative energy is left out)

    @property
    def relative(self) -> bool:
        return self.passthrough.relative is not None

    @property
    def shares(self) -> list[float]:
        return [b.share for b in self.blocks]

    def lines(self) -> list[str]:
        out = ["Blocks layout:"]
        for i, b in enumerate(self.blocks):
            line = f"{self.layout.block_line(i)} energy={b.energy:9.4g}"
            if b.relative is not None:
                line += f" relative={b.relative:9.4g}"
            out.append(f"{line} share={100 * b.share:5.1f}%")
        out.append(f'Vector string : "{self.layout.vector_string}"')
        p = self.passthrough
        extra = f" relative={p.relative:.4g}" if p.relative is not None else ""
        out.append(f"Pass through layers: {p.tensors} (energy={p.energy:.4g}{extra}, not in the shares)")
        if self.no_base:
            out.append(
                f"{len(self.no_base)} modules have no base weight and are left out of the relative energy: {', '.join(self.no_base[:5])}{' …' if len(self.no_base) > 5 else ''}"
            )
        return out


def suggest(shares: Sequence[float], keep: float) -> list[float]:
    """The smallest 0/1 vector (entry 0 = 1) whose blocks hold at least `keep` of the energy:
    the blocks with the largest shares, taken until the share is reached."""
    if not 0 < keep <= 1:
        raise UserError(f"The share to keep must be in (0, 1]; got {keep}.")
    vector = [1.0] + [0.0] * len(shares)
    total = sum(shares)
    got = 0.0
    for i in sorted(range(len(shares)), key=lambda i: -shares[i]):
        if total <= 0 or got >= keep * total * (1 - 1e-9):
            break
        vector[i + 1] = 1.0
        got += shares[i]
    return vector


def energy(lora, base=None) -> EnergyReport:
    """Per-block ‖ΔW‖_F of a LoRA file (a path or a read LoraFile); with a base checkpoint, also
    relative to each module's base weight, read one tensor at a time."""
    from ..tensorfile import TensorFile
    from .basekeys import BaseIndex, frobenius
    from .lorafile import LoraFile, read_lora

    lf = lora if isinstance(lora, LoraFile) else read_lora(lora)
    lay = layout(lf.tensors)
    norms = {name: lf.module(name).norm() for name in lf.names}
    rel: dict[str, float] = {}
    no_base: list[str] = []
    if base is not None:
        with TensorFile(base, what="an SDXL base checkpoint (.safetensors)") as tf:
            index = BaseIndex(tf)
            no_base = [n for n in lf.names if n not in index]
            for name in sorted((n for n in lf.names if n in index), key=lambda n: index[n].offset):
                w = frobenius(index.read(name))
                rel[name] = norms[name] / w if w > 0 else math.inf

    def total(name: str, short: str, keys: Iterable[str]) -> BlockEnergy:
        keys = list(keys)
        modules = {module_of(k) for k in keys}
        e = sum(norms[m] for m in modules)
        r = sum(rel.get(m, 0.0) for m in modules) if base is not None else None
        return BlockEnergy(name, short, len(keys), e, r)

    blocks = [total(b.name, b.short, b.keys) for b in lay.blocks]
    values = [b.relative if base is not None else b.energy for b in blocks]
    whole = sum(values)
    for b, v in zip(blocks, values):
        b.share = v / whole if whole > 0 else 0.0
    return EnergyReport(lay, blocks, total("pass-through", "BASE", lay.passthrough), no_base)
