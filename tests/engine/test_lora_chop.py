"""chop: 0/1 vectors give chop_blocks' file, fractional weights are linear, presets and bad vectors,
and a resized-then-chopped file loads in diffusers."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from loradrop.engine import tensorfile
from loradrop.engine.lora.basekeys import BaseIndex
from loradrop.engine.lora.blocks import VectorLengthError, layout
from loradrop.engine.lora.chop import chop
from loradrop.engine.lora.resize import resize
from loradrop.errors import UserError
from loradrop.testing import conditioning_dims, diffusers_pipeline

# One module in each of the 20 blocks of an SDXL LoCon, plus pass-through modules.
ONE_PER_BLOCK = re.compile(
    r"lora_unet_((input|output)_blocks_\d+_0_(in_layers_2|op)|middle_block_[02]_in_layers_2|middle_block_1_proj_in)"
)
PASS_THROUGH = [
    "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    "lora_te2_text_model_encoder_layers_1_mlp_fc2",
    "lora_unet_time_embed_0",
]
META = {"ss_output_name": "blocks", "modelspec.title": "Blocks", "ss_training_comment": "kept"}


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_path):
    """UNet modules in fp16, text encoder modules in fp32 (dtypes must survive a chop)."""
    with tensorfile.TensorFile(tiny_path) as tf:
        index = BaseIndex(tf)
        names = [n for n in index.by_lora if ONE_PER_BLOCK.fullmatch(n)] + PASS_THROUGH
        shapes = {n: index[n].shape for n in names}
    assert len(names) == 23
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        dtype = torch.float32 if name.startswith("lora_te") else torch.float16
        tensors[name + ".lora_down.weight"] = torch.randn(4, *shape[1:], generator=g).to(dtype)
        tensors[name + ".lora_up.weight"] = (
            torch.randn(shape[0], 4, *([1] * (len(shape) - 2)), generator=g) * 0.1
        ).to(dtype)
        tensors[name + ".alpha"] = torch.tensor(2.0, dtype=dtype)
    path = tmp_path_factory.mktemp("chop") / "blocks.safetensors"
    save_file(tensors, str(path), metadata=META)
    return path


def delta(sd, name):
    down, up = sd[name + ".lora_down.weight"].double(), sd[name + ".lora_up.weight"].double()
    return float(sd[name + ".alpha"]) / down.shape[0] * up.flatten(1) @ down.flatten(1)


def vector(*keep, n=20, g="1", w="1"):
    return ",".join([g] + [w if i in keep else "0" for i in range(n)])


def test_layout_of_the_fixture(lora):
    lay = layout(load_file(str(lora)))
    assert len(lay.blocks) == 20 and len(lay.passthrough) == 9
    assert lay.vector_string.startswith("1,INP01,INP02,INP03,") and lay.vector_string.endswith(",OUT07,OUT08")


def test_zero_one_keeps_exactly_the_expected_keys_untouched(lora):
    src = load_file(str(lora))
    lay = layout(src)
    text = vector(3, 12)
    result = chop(lora, text)
    assert result.path == lora.with_name("blocks-chop.safetensors")
    out = load_file(str(result.path))
    want = set(lay.passthrough) | set(lay.blocks[3].keys) | set(lay.blocks[12].keys)
    assert set(out) == want
    for k in want:
        assert out[k].dtype == src[k].dtype and torch.equal(out[k], src[k])
    meta = tensorfile.read_metadata(result.path)
    assert meta["block_vector_string"] == text and meta["ss_training_comment"] == "kept"
    assert meta["ss_output_name"] == meta["modelspec.title"] == "blocks-chop"  # its own name in A1111's list


def test_the_guides_vector_keeps_output_blocks_1(lora, tmp_path):
    result = chop(lora, "1,0,0,0,0,0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,0", tmp_path / "out1.safetensors")
    unet = {k for k in load_file(str(result.path)) if k.startswith("lora_unet_") and "time_embed" not in k}
    assert unet and all(k.startswith("lora_unet_output_blocks_1_") for k in unet)
    assert [line for line in result.lines() if "weight=" in line] == [
        "  [12] output_blocks.1 layers=3   weight=1"
    ]


def test_entry_zero_is_a_global_factor_for_the_unet_blocks_only(lora, tmp_path):
    out = load_file(str(chop(lora, vector(*range(20), g="0"), tmp_path / "none.safetensors").path))
    assert set(out) == set(
        layout(load_file(str(lora))).passthrough
    )  # text encoders and time_embed pass through


@pytest.mark.parametrize(
    ("text", "scaled"),
    [
        (vector(*range(20), w="1").replace("1,1,", "1,0.5,", 1), {0}),
        (vector(*range(20), g="0.25"), set(range(20))),
    ],
)
def test_a_fractional_weight_scales_delta_linearly(lora, tmp_path, text, scaled):
    src = load_file(str(lora))
    lay = layout(src)
    factor = 0.5 if scaled == {0} else 0.25
    out = load_file(str(chop(lora, text, tmp_path / "frac.safetensors").path))
    assert set(out) == set(src)
    for i, block in enumerate(lay.blocks):
        for name in block.modules:
            for part in (".alpha", ".lora_down.weight"):
                assert torch.equal(out[name + part], src[name + part])
            want = delta(src, name) * (factor if i in scaled else 1.0)
            torch.testing.assert_close(delta(out, name), want, rtol=2e-3, atol=1e-6)
    for k in lay.passthrough:
        assert torch.equal(out[k], src[k])


def test_modules_of_other_alphas_get_the_files_alpha_and_keep_their_delta(lora, tmp_path):
    """A file whose alphas differ (resize_lora's, say) comes out with one alpha, each module's
    own scale folded into lora_up: ΔW (times its block weight) and lora_down are unchanged."""
    src = load_file(str(lora))
    lay = layout(src)
    odd = [lay.blocks[0].modules[0], lay.blocks[5].modules[0], "lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    for i, name in enumerate(odd):
        src[name + ".alpha"] = torch.tensor(0.5 + i, dtype=src[name + ".alpha"].dtype)
    mixed = tmp_path / "mixed.safetensors"
    save_file(src, str(mixed), metadata=META)
    text = vector(*range(20)).replace("1,1,", "1,0.5,", 1)  # block 0 at half
    result = chop(mixed, text, tmp_path / "named.safetensors")
    out = load_file(str(result.path))
    assert set(out) == set(src) and {float(t) for k, t in out.items() if k.endswith(".alpha")} == {2.0}
    for name in {k.split(".")[0] for k in src}:
        assert torch.equal(out[name + ".lora_down.weight"], src[name + ".lora_down.weight"])
        want = (0.5 if name in lay.blocks[0].modules else 1.0) * delta(src, name)
        assert float((delta(out, name) - want).norm() / want.norm()) < 1e-3  # fp16 rounding of lora_up
    meta = tensorfile.read_metadata(result.path)
    assert (
        meta["ss_network_alpha"] == "2.0" and meta["ss_output_name"] == "named"
    )  # a file named by the user keeps that name


def test_wrong_length_shows_the_layout(lora):
    with pytest.raises(
        VectorLengthError, match=r"20 UNet blocks, so the vector needs 21 entries.*got 5"
    ) as e:
        chop(lora, "1,1,1,1,1")
    assert len(e.value.layout.blocks) == 20 and "Blocks layout:" in e.value.layout.lines()


def test_presets_and_named_vectors(lora, tmp_path):
    lay = layout(load_file(str(lora)))
    result = chop(lora, "SDXL-LyC-OUTALL", tmp_path / "outall.safetensors")
    kept = {k for k in load_file(str(result.path)) if k not in lay.passthrough}
    assert kept == {k for b in lay.blocks if b.section == "output_blocks" for k in b.keys}
    assert (
        tensorfile.read_metadata(result.path)["block_vector_string"]
        == "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"
    )
    named = chop(lora, "mine:" + vector(3, 12), tmp_path / "named.safetensors")
    assert set(load_file(str(named.path))) == set(lay.passthrough) | set(lay.blocks[3].keys) | set(
        lay.blocks[12].keys
    )
    with pytest.raises(VectorLengthError):
        chop(
            lora, "SDXL-OUTALL", tmp_path / "short.safetensors"
        )  # a 12-entry preset is for attention-only LoRAs


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1,x" + ",1" * 19, "Entry 1"),
        ("1,,1" + ",1" * 18, "Entry 1 .* is empty"),
        ("SDXL-LyC-EVERYTHING", "neither a block vector nor a preset"),
        ("1,1 0" + ",1" * 19, "sub-vectors"),
    ],
)
def test_malformed_vectors_name_the_problem(lora, text, says):
    with pytest.raises(UserError, match=says):
        chop(lora, text)


def test_resize_then_chop_loads_in_diffusers(lora, tmp_path, tiny_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from loradrop.engine.models.sdxl import load_sdxl

    resized = resize(tiny_path, lora, "fro_ckpt=1,thr=-3", tmp_path)
    chopped = chop(resized.path, vector(*range(0, 20, 2)))
    keys = load_file(str(chopped.path))
    modules = {k.split(".")[0] for k in keys}
    assert any(m.startswith("lora_unet_output") for m in modules) and any(
        m.startswith("lora_te1") for m in modules
    )

    m = load_sdxl(tiny_path)
    pipe = diffusers_pipeline(m)
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    width, pooled_width = conditioning_dims(m)
    ctx = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(1))
    cond = {"text_embeds": torch.zeros(1, pooled_width), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        before = m.unet(x, t, ctx, added_cond_kwargs=cond).sample
        pipe.load_lora_weights(str(chopped.path))
        after = pipe.unet(x, t, ctx, added_cond_kwargs=cond).sample

    def adapted(module):
        return sum(isinstance(x, BaseTunerLayer) for x in module.modules())

    assert adapted(pipe.unet) == sum(m.startswith("lora_unet_") for m in modules)
    assert adapted(pipe.text_encoder) + adapted(pipe.text_encoder_2) == sum(
        m.startswith("lora_te") for m in modules
    )
    assert not torch.allclose(before, after)
