"""Applying a LoRA in memory with a block vector (the Block Weight loader's meaning), and undoing it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from loradrop.engine.lora.apply import apply_lora, lora_targets, unapply
from loradrop.engine.models.sdxl import load_sdxl
from loradrop.errors import UserError
from loradrop.testing import conditioning_dims, diffusers_pipeline

# module → (diffusers component, module path); blocks in this file: input_blocks.4, output_blocks.1
MODULES = {
    "lora_unet_input_blocks_4_1_proj_in": ("unet", "down_blocks.1.attentions.0.proj_in"),
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v": (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v",
    ),
    "lora_unet_output_blocks_1_0_in_layers_2": ("unet", "up_blocks.0.resnets.1.conv1"),
    "lora_te1_text_model_encoder_layers_2_mlp_fc1": ("te1", "text_model.encoder.layers.2.mlp.fc1"),
    "lora_te2_text_model_encoder_layers_7_self_attn_q_proj": (
        "te2",
        "text_model.encoder.layers.7.self_attn.q_proj",
    ),
}
NON_BLOCK = {"lora_unet_time_embed_0": ("unet", "time_embedding.linear_1")}
# diffusers 0.42 cannot load a text encoder q/k/v adapter without its out_proj ("Could not
# automatically infer state dict type"), so the comparison with it uses an MLP there.
TE2_MLP = {"lora_te2_text_model_encoder_layers_7_mlp_fc1": ("te2", "text_model.encoder.layers.7.mlp.fc1")}


@pytest.fixture(scope="module")
def model(tiny_path):
    return load_sdxl(tiny_path, components=("unet", "te1", "te2"))


def weight(model, name):
    component, path = {**MODULES, **NON_BLOCK, **TE2_MLP}[name]
    root = model.component(component)
    path = path if component == "unet" or hasattr(root, "text_model") else path.removeprefix("text_model.")
    return root.get_submodule(path).weight


def write(path, model, names, rank=4):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name in names:
        w = weight(model, name)
        tensors[name + ".lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        tensors[name + ".lora_up.weight"] = (
            torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=g) * 0.1
        )
        tensors[name + ".alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def lora(tmp_path_factory, model):
    return write(tmp_path_factory.mktemp("apply") / "l.safetensors", model, [*MODULES, *NON_BLOCK])


def delta(sd, name, like):
    down, up = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"]
    return (float(sd[name + ".alpha"]) / down.shape[0] * up.flatten(1) @ down.flatten(1)).reshape(like.shape)


def check(model, lora, before, ratios):
    sd = load_file(str(lora))
    for name, r in ratios.items():
        w = weight(model, name)
        torch.testing.assert_close(w, before[name] + r * delta(sd, name, w), rtol=1e-5, atol=1e-6)


@pytest.fixture
def before(model):
    saved = {n: weight(model, n).detach().clone() for n in [*MODULES, *NON_BLOCK]}
    yield saved
    for n, w in saved.items():  # every test leaves the base as it found it
        assert torch.equal(weight(model, n), w), n


def test_all_ones_adds_delta_and_unapply_restores_exactly(model, lora, before):
    applied = apply_lora(model, lora)
    assert applied.vector == [1.0, 1.0, 1.0] and not applied.unmatched
    check(model, lora, before, dict.fromkeys([*MODULES, *NON_BLOCK], 1.0))
    unapply(applied)
    unapply(applied)  # harmless twice


def test_entry_zero_is_base_and_blocks_follow_the_layout(model, lora, before):
    with apply_lora(model, lora, "0,0.5,1"):
        check(
            model,
            lora,
            before,
            {
                "lora_te1_text_model_encoder_layers_2_mlp_fc1": 0.0,
                "lora_te2_text_model_encoder_layers_7_self_attn_q_proj": 0.0,
                "lora_unet_time_embed_0": 0.0,  # not in a block: BASE
                "lora_unet_input_blocks_4_1_proj_in": 0.5,
                "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v": 0.5,
                "lora_unet_output_blocks_1_0_in_layers_2": 1.0,
            },
        )


def test_inverse_and_strengths(model, lora, before):
    with apply_lora(model, lora, "0,0.5,1", inverse=True, strength_clip=2.0, strength_model=0.5):
        check(
            model,
            lora,
            before,
            {
                "lora_te1_text_model_encoder_layers_2_mlp_fc1": 2.0,
                "lora_unet_time_embed_0": 0.5,
                "lora_unet_input_blocks_4_1_proj_in": 0.25,
                "lora_unet_output_blocks_1_0_in_layers_2": 0.0,
            },
        )


def test_a_short_vector_keeps_its_last_weight_and_presets_work(model, lora, before):
    with apply_lora(model, lora, "1,0.3"):
        check(
            model,
            lora,
            before,
            {"lora_unet_input_blocks_4_1_proj_in": 0.3, "lora_unet_output_blocks_1_0_in_layers_2": 0.3},
        )
    with apply_lora(model, lora, "SDXL-LyC-NONE") as applied:
        assert not applied.originals  # nothing patched, nothing kept


def test_unknown_modules_are_listed_and_misfits_leave_the_model_untouched(model, lora, before, tmp_path):
    sd = load_file(str(lora))
    sd["lora_unet_output_blocks_9_0_in_layers_2.lora_down.weight"] = torch.ones(2, 4)
    sd["lora_unet_output_blocks_9_0_in_layers_2.lora_up.weight"] = torch.ones(4, 2)
    save_file(sd, str(tmp_path / "stray.safetensors"))
    with apply_lora(model, tmp_path / "stray.safetensors") as applied:
        assert applied.unmatched == ["lora_unet_output_blocks_9_0_in_layers_2"]
    sd = load_file(str(lora))
    sd["lora_unet_output_blocks_1_0_in_layers_2.lora_down.weight"] = torch.ones(4, 7)  # wrong input size
    save_file(sd, str(tmp_path / "misfit.safetensors"))
    with pytest.raises(UserError, match="does not fit"):
        apply_lora(model, tmp_path / "misfit.safetensors")


def test_every_linear_and_conv_has_its_kohya_name(model):
    targets = lora_targets(model)
    for name in [*MODULES, *NON_BLOCK]:
        assert targets[name].weight is weight(model, name)


def test_the_same_result_as_diffusers_load_lora_weights(model, tiny_path, tmp_path):

    names = [n for n in MODULES if "self_attn" not in n] + list(TE2_MLP)
    path = write(tmp_path / "blocks.safetensors", model, names)
    other = load_sdxl(tiny_path)
    pipe = diffusers_pipeline(other)
    pipe.load_lora_weights(str(path))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49407, (1, 77), generator=g)
    width, pooled_width = conditioning_dims(other)
    x, t, ctx = (
        torch.randn(1, 4, 16, 16, generator=g),
        torch.tensor([300]),
        torch.randn(1, 77, width, generator=g),
    )
    cond = {
        "text_embeds": torch.randn(1, pooled_width, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }
    with torch.no_grad():
        theirs = (
            pipe.unet(x, t, ctx, added_cond_kwargs=cond).sample,
            pipe.text_encoder(ids)[0],
            pipe.text_encoder_2(ids)[0],
        )
        plain = model.unet(x, t, ctx, added_cond_kwargs=cond).sample
        with apply_lora(model, path):
            ours = (
                model.unet(x, t, ctx, added_cond_kwargs=cond).sample,
                model.te1(ids)[0],
                model.te2(ids)[0],
            )
    assert not torch.allclose(plain, ours[0], atol=1e-4)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
