"""Rendering several prompts as one batch: the same pictures as one prompt at a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loradrop.engine.data.prompts import SamplePrompt
from loradrop.engine.train.sampling import Render

CPU = torch.device("cpu")
PROMPTS = [
    SamplePrompt("a red circle", width=64, height=64, seed=7, steps=4, cfg=5.0),
    SamplePrompt("a blue square", width=64, height=64, steps=4, cfg=5.0),  # no seed: default_seed + 1
    SamplePrompt("a red circle", width=64, height=64, seed=8, steps=4, cfg=5.0),
]


def _latents(model, *prompts: SamplePrompt, default_seed: int) -> torch.Tensor:
    render = Render(model, *prompts, device=CPU, dtype=torch.float32, default_seed=default_seed).run()
    assert len(render.images()) == len(prompts)
    return render.latents


def test_a_batch_renders_what_each_prompt_renders_alone(tiny_model):
    batch = _latents(tiny_model, *PROMPTS, default_seed=40)
    alone = torch.cat(
        [
            _latents(tiny_model, PROMPTS[0], default_seed=0),
            _latents(tiny_model, dataclasses.replace(PROMPTS[1], seed=41), default_seed=0),
            _latents(tiny_model, PROMPTS[2], default_seed=0),
        ]
    )
    # equal up to float rounding: a batched matmul may sum in another order
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batch[0], batch[2], atol=1e-2)  # the seed, not the text, made them differ


def test_prompts_of_different_sizes_are_refused_together(tiny_model):
    with pytest.raises(ValueError, match="one size"):
        Render(
            tiny_model,
            PROMPTS[0],
            dataclasses.replace(PROMPTS[1], width=128),
            device=CPU,
            dtype=torch.float32,
            default_seed=0,
        )
