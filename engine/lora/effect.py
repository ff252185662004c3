"""Where a LoRA's effect sits, block by block, measured on the model rather than read off the
weights: what a user does by hand when they look at samples with per-block weights.

A block's energy (‖ΔW‖, see blocks.energy) says where the LoRA changed the most numbers, not
where it changed the picture: the wide inner blocks hold most of the energy because they hold
most of the weights. On the learned twin a colour concept has 2% of the energy in OUT04-OUT05
and all of its effect there; a chop to the high-energy blocks loses it (docs/twin.md).

The effect of block i is how far the denoised latents move when block i alone is switched off
(every other block, and the text encoders, left on), for a few seeded prompts at a few steps:
an ablation, so blocks that only matter together still count.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..data.prompts import SamplePrompt
from ..models.sdxl import SDXL, Prediction
from .blocks import Layout, format_weight, layout, suggest
from .lorafile import LoraFile, read_lora

EFFECT_STEPS = 8  # denoising steps per prompt: the layout of a picture is set in the first few


@dataclass(frozen=True)
class EffectReport:
    layout: Layout
    effects: list[float]  # per block: mean ‖latents(all) − latents(all but this block)‖
    whole: float  # mean ‖latents(all) − latents(no UNet block)‖, for scale

    @property
    def shares(self) -> list[float]:
        total = sum(self.effects)
        return [e / total if total > 0 else 0.0 for e in self.effects]

    def lines(self) -> list[str]:
        out = ["Block effects (latents moved when the block alone is switched off):"]
        for i, (e, s) in enumerate(zip(self.effects, self.shares)):
            out.append(f"{self.layout.block_line(i)} effect={e:9.4g} share={100 * s:5.1f}%")
        out.append(f"All blocks off moves them {self.whole:.4g}.")
        return out


def suggest_by_effect(
    model: SDXL, lora: str | os.PathLike | LoraFile, prompts: Sequence[SamplePrompt], keep: float, **kwargs
) -> tuple[list[float], EffectReport]:
    """The smallest 0/1 chop vector whose blocks hold `keep` of the measured effect, and the report."""
    report = block_effects(model, lora, prompts, **kwargs)
    return suggest(report.shares, keep), report


def block_effects(
    model: SDXL,
    lora: str | os.PathLike | LoraFile,
    prompts: Sequence[SamplePrompt],
    *,
    steps: int = EFFECT_STEPS,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> EffectReport:
    """Ablate each UNet block of `lora` in turn on `model` and measure how far the latents of
    `prompts` (each run for `steps` denoising steps from its own seed) move."""
    from ..train.sampling import Render
    from .apply import apply_lora

    lf = lora if isinstance(lora, LoraFile) else read_lora(lora)
    lay = layout(lf.tensors)
    n = len(lay.blocks)
    device = next(model.unet.parameters()).device
    short = [dataclasses.replace(p, steps=min(p.steps, steps)) for p in prompts]
    prediction = Prediction.trained_with(lf.metadata, model.prediction)  # as the LoRA's run sampled

    def latents(weights: list[float]) -> list[torch.Tensor]:
        vector = ",".join(format_weight(w) for w in [1.0, *weights])
        with apply_lora(model, lf, vector):
            out = []
            for i, p in enumerate(short):
                render = Render(
                    model, p, device=device, dtype=torch.float32, default_seed=seed + i, prediction=prediction
                )
                out.append(render.run().latents)
            return out

    def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return sum(float((x - y).norm()) for x, y in zip(a, b)) / len(a)

    runs = n + 2
    full = latents([1.0] * n)
    effects = []
    for i in range(n):
        if progress is not None:
            progress(i + 1, runs)
        effects.append(distance(full, latents([0.0 if j == i else 1.0 for j in range(n)])))
    if progress is not None:
        progress(runs, runs)
    return EffectReport(lay, effects, distance(full, latents([0.0] * n)))
