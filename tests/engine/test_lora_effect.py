"""Block effects measured on the model: a block that changes the picture is found, one whose
adapters are near zero is not, whatever their share of the ΔW energy."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from loradrop.engine.data.prompts import SamplePrompt
from loradrop.engine.lora.blocks import energy
from loradrop.engine.lora.effect import block_effects, suggest_by_effect
from loradrop.engine.models.sdxl import load_sdxl

# Two UNet blocks of the twin: a small conv that moves the picture, and a wide attention whose
# adapter is big in numbers but sits where the sample barely looks (scaled to almost nothing).
LOUD = ("lora_unet_output_blocks_1_0_in_layers_2", "up_blocks.0.resnets.1.conv1", 1.0)
QUIET = ("lora_unet_input_blocks_4_1_proj_in", "down_blocks.1.attentions.0.proj_in", 1e-4)


@pytest.fixture(scope="module")
def model(tiny_path):
    return load_sdxl(tiny_path)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, model):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, path, scale in (LOUD, QUIET):
        w = model.unet.get_submodule(path).weight
        rank = 4
        tensors[name + ".lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g)
        # The quiet block's ΔW energy is made the larger by its width, then scaled down in up.
        tensors[name + ".lora_up.weight"] = (
            torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g) * scale
        )
        tensors[name + ".alpha"] = torch.tensor(float(rank))
    path = tmp_path_factory.mktemp("effect") / "two-blocks.safetensors"
    save_file(tensors, str(path))
    return path


PROMPTS = [SamplePrompt("a red circle", width=64, height=64, seed=1, steps=4, cfg=5.0)]


def test_the_block_that_moves_the_sample_holds_the_effect(model, lora):
    report = block_effects(model, lora, PROMPTS, steps=4)
    names = [b.name for b in report.layout.blocks]
    loud, quiet = names.index("output_blocks.1"), names.index("input_blocks.4")
    # Not zero for the quiet one: a sampler amplifies any difference a little over its steps.
    assert report.shares[loud] > 0.9 and report.effects[quiet] < 0.1 * report.effects[loud], report.lines()
    assert report.whole > 0


def test_the_suggestion_keeps_the_block_of_effect_and_the_model_is_left_as_it_was(model, lora):
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    vector, report = suggest_by_effect(model, lora, PROMPTS, 0.9, steps=4)
    names = [b.name for b in report.layout.blocks]
    assert (
        vector[0] == 1
        and vector[1 + names.index("output_blocks.1")] == 1
        and vector[1 + names.index("input_blocks.4")] == 0
    )
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert energy(lora).blocks[names.index("output_blocks.1")].energy > 0  # both blocks are in the file
