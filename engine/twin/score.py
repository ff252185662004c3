"""Known-answer scores on the learned twin: does it draw its world, does a LoRA draw the concept.

Every score samples seeded prompts with the project's own sampler (euler_a, CFG) at the world's
size and asks the judge; a LoRA is applied block-weighted exactly as a preview applies it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..data.prompts import SamplePrompt
from ..lora.apply import apply_lora
from ..models.sdxl import SDXL
from ..train.sampling import sample
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


def draw(model: SDXL, prompt: str, seed: int):
    p = SamplePrompt(prompt, width=world.SIZE, height=world.SIZE, seed=seed, steps=STEPS, cfg=CFG)
    return sample(
        model, p, device=next(model.unet.parameters()).device, dtype=torch.float32, default_seed=seed
    )


def world_score(model: SDXL, count: int = 32, seed: int = 5) -> dict[str, Score]:
    """How often the base draws what its caption says: colour, shape, and both."""
    scenes = world.scenes(count, seed)
    verdicts = [judge.judge(draw(model, s.caption, i)) for i, s in enumerate(scenes)]
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
    if lora is None:
        hits = sum(judge.judge(draw(model, p, i)).colour == concept.colour for i, p in enumerate(prompts))
        return Score(hits, count)
    with apply_lora(model, lora, vector):
        hits = sum(judge.judge(draw(model, p, i)).colour == concept.colour for i, p in enumerate(prompts))
    return Score(hits, count)
