"""Known-answer scores on the learned twin: does it draw its world, does a LoRA draw the concept.

Every score samples seeded prompts with the project's own sampler (euler_a, CFG) at the world's
size and asks the judge; a LoRA is applied block-weighted exactly as a preview applies it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..data.prompts import SamplePrompt
from ..lora.apply import apply_lora
from ..models.sdxl import SDXL
from ..train.sampling import Render
from . import judge, world
from .concept import CONCEPT, Concept

STEPS = 20
CFG = 5.0


@dataclass(frozen=True)
class Score:
    hits: int
    total: int

    @property
    def share(self) -> float:
        return self.hits / self.total

    def __str__(self) -> str:
        return f"{self.hits}/{self.total} ({100 * self.share:.0f}%)"


def draw(model: SDXL, prompts: Sequence[str]) -> list[Image.Image]:
    """Prompt i sampled from seed i, all of them in one batch (the same pictures as one by one)."""
    batch = [
        SamplePrompt(p, width=world.SIZE, height=world.SIZE, seed=i, steps=STEPS, cfg=CFG)
        for i, p in enumerate(prompts)
    ]
    render = Render(
        model, *batch, device=next(model.unet.parameters()).device, dtype=torch.float32, default_seed=0
    )
    return render.run().images()


def world_score(model: SDXL, count: int = 32, seed: int = 5) -> dict[str, Score]:
    """How often the base draws what its caption says: colour, shape, and both."""
    scenes = world.scenes(count, seed)
    verdicts = [judge.judge(image) for image in draw(model, [s.caption for s in scenes])]
    colour = sum(v.colour == s.colour for v, s in zip(verdicts, scenes))
    shape = sum(v.shape == s.shape for v, s in zip(verdicts, scenes))
    both = sum(v.colour == s.colour and v.shape == s.shape for v, s in zip(verdicts, scenes))
    return {"colour": Score(colour, count), "shape": Score(shape, count), "both": Score(both, count)}


def concept_score(
    model: SDXL,
    lora: str | os.PathLike | None = None,
    vector: str | None = None,
    *,
    count: int = 32,
    seed: int = 3,
    concept: Concept = CONCEPT,
) -> Score:
    """How many of `count` seeded trigger-word samples show the concept's colour, with the LoRA
    (weighted by `vector`, as the Block Weight loader reads it) or without one."""
    prompts = concept.prompts(count, seed)
    with apply_lora(model, lora, vector) if lora is not None else contextlib.nullcontext():
        images = draw(model, prompts)
    return Score(sum(judge.judge(image).colour == concept.colour for image in images), count)
