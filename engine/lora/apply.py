"""Apply a LoRA to a loaded SDXL in memory, block-weighted as the Inspire Block Weight loader does,
and take it off again exactly.

Loader semantics: entry 0 of the vector is BASE (the text encoders and the UNet keys outside the
input/middle/output blocks), entries 1… weigh the file's blocks in layout order; a vector shorter
than the blocks leaves the remaining blocks at the last weight read. Each module adds
strength · r · (alpha / rank) · up · down to its weight (strength_clip for the text encoders,
strength_model for the UNet); r = 0 leaves it alone; `inverse` uses 1 − r everywhere.

The weights are patched in place (so a preview runs at full speed) and the originals are kept
(on the CPU unless told otherwise) until `unapply`, which copies them back bit for bit: the
daemon keeps one base model loaded and previews many vectors on it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from loradrop.errors import UserError

from ..models import keymap
from ..models.sdxl import SDXL
from .blocks import layout, parse_vector
from .lorafile import LoraFile, read_lora

log = logging.getLogger(__name__)


@dataclass
class Applied:
    """What `apply_lora` changed. Use it as a context manager, or call `unapply` when done."""

    vector: list[float]  # per entry, as used (after `inverse`)
    originals: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # LoRA modules the model has no weight for

    def __enter__(self) -> "Applied":
        return self

    def __exit__(self, *exc) -> None:
        unapply(self)


def lora_targets(model: SDXL) -> dict[str, nn.Module]:
    """kohya module name → the Linear/Conv2d of the loaded model it adapts."""
    targets: dict[str, nn.Module] = {}
    for component in ("unet", "te1", "te2"):
        root = model.component(component)
        if root is None:
            continue
        names = model.unet_names if component == "unet" else None
        for path, module in root.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                targets[keymap.lora_name(component, path, names)] = module
    return targets


def apply_lora(
    model: SDXL,
    lora: str | os.PathLike | LoraFile,
    vector: str | None = None,
    *,
    strength_model: float = 1.0,
    strength_clip: float = 1.0,
    inverse: bool = False,
    seed: int = 0,
    a: float = 4.0,
    b: float = 1.0,
    backup_device: str | torch.device = "cpu",
) -> Applied:
    """Patch `model` with the LoRA weighted by a block vector (default: every entry 1).

    The weights it changes are copied to `backup_device` first: the CPU by default; on a GPU
    with room to spare, the GPU itself makes apply and unapply faster."""
    lf = lora if isinstance(lora, LoraFile) else read_lora(lora)
    lay = layout(lf.tensors)
    values = (
        parse_vector(vector, len(lay.blocks), seed=seed, a=a, b=b)
        if vector
        else [1.0] * (len(lay.blocks) + 1)
    )
    if len(values) != len(lay.blocks) + 1:
        log.warning(
            "%s has %d blocks but the vector has %d entries; as in the Block Weight loader, blocks past "
            "the end keep the last weight and extra entries are ignored.",
            lf.path,
            len(lay.blocks),
            len(values),
        )
    # The loader starts from 1.0 and keeps the last weight read once the vector runs out.
    per_block = [
        values[min(i + 1, len(values) - 1)] if len(values) > 1 else 1.0 for i in range(len(lay.blocks))
    ]
    base = values[0]
    if inverse:
        values, per_block, base = [1.0 - v for v in values], [1.0 - v for v in per_block], 1.0 - base
    targets = lora_targets(model)
    applied = Applied(values)
    try:
        _patch(
            lf,
            lay,
            targets,
            base,
            per_block,
            strength_model,
            strength_clip,
            torch.device(backup_device),
            applied,
        )
    except BaseException:
        unapply(applied)
        raise
    if applied.unmatched:
        log.warning(
            "%s: %d LoRA modules match no layer of the model and were skipped (e.g. %s).",
            lf.path,
            len(applied.unmatched),
            applied.unmatched[0],
        )
    return applied


def _patch(
    lf: LoraFile,
    lay,
    targets,
    base: float,
    per_block: list[float],
    strength_model: float,
    strength_clip: float,
    backup_device: torch.device,
    applied: Applied,
) -> None:
    with torch.no_grad():
        for name in lf.names:
            target = targets.get(name)
            if target is None:
                applied.unmatched.append(name)
                continue
            block = lay.index_of(name)
            ratio = base if block is None else per_block[block]
            strength = strength_clip if name.startswith(("lora_te1_", "lora_te2_")) else strength_model
            if ratio * strength == 0:
                continue
            weight = target.weight
            module = lf.module(name)
            if (
                module.out_features * math.prod(module.in_shape) != weight.numel()
                or module.out_features != weight.shape[0]
            ):
                raise UserError(
                    f"{lf.path} module {name} does not fit the model's weight of shape {list(weight.shape)}; the LoRA was trained on another model family."
                )
            delta = module.delta(weight.device, base=weight) * (
                ratio * strength
            )  # a DoRA's change depends on the weight
            applied.originals.append((weight, weight.detach().to(backup_device, copy=True)))
            weight.copy_((weight.float() + delta.reshape(weight.shape)).to(weight.dtype))


def unapply(applied: Applied) -> None:
    """Put back the original weights (exactly); calling it twice is harmless."""
    with torch.no_grad():
        for weight, original in applied.originals:
            weight.copy_(original.to(weight.device))
    applied.originals.clear()
