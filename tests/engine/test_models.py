"""The foundation: the tiny twin, the SGM ↔ diffusers map, the LoCon module set, bad input."""

from __future__ import annotations

import collections
import re

import pytest
import torch

from loradrop.engine import tensorfile
from loradrop.engine.models import keymap
from loradrop.engine.models.configs import sdxl_config, tiny_config
from loradrop.engine.models.sdxl import COMPONENTS, build_empty, component_map, load_sdxl
from loradrop.errors import UserError
from loradrop.testing import make_dataset

SEED_LAYOUT = [9, 9, 3, 78, 75, 3, 318, 315, 9, 306, 9, 318, 318, 321, 78, 78, 81, 12, 12, 12]


# ---------------------------------------------------------------- the twin


def test_twin_runs_forward(tiny_model):
    m = tiny_model
    tok1, tok2 = m.tokenizers
    ids1 = tok1(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = tok2(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    # the real CLIP BPE: "a photo of a cat" is 320, 1125, 539, 320, 2368 between start and end
    assert ids1[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids2[0, 7].item() == 0 and ids1[0, 7].item() == 49407  # TE2 pads with id 0
    with torch.no_grad():
        o1 = m.te1(ids1, output_hidden_states=True)
        o2 = m.te2(ids2, output_hidden_states=True)
        assert len(o1.hidden_states) == 13 and len(o2.hidden_states) == 33  # 12 and 32 layers
        context = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1)
        x = torch.randn(1, 4, 16, 16)
        ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]])
        eps = m.unet(
            x,
            torch.tensor([500]),
            context,
            added_cond_kwargs={"text_embeds": o2.text_embeds, "time_ids": ids},
        ).sample
        img = m.vae.decode(x).sample
        back = m.vae.encode(img).latent_dist.mean
    assert eps.shape == x.shape and torch.isfinite(eps).all() and eps.std() > 0
    assert img.shape == (1, 3, 128, 128) and back.shape == x.shape


def test_twin_is_deterministic(tiny_path, tmp_path):
    from loradrop.engine.models.tiny import make_tiny

    again = make_tiny(tmp_path / "again.safetensors")
    assert again.read_bytes() == tiny_path.read_bytes()


def test_twin_has_sdxl_topology():
    full, tiny = sdxl_config(), tiny_config()
    for key in (
        "down_block_types",
        "up_block_types",
        "layers_per_block",
        "transformer_layers_per_block",
        "addition_embed_type",
        "use_linear_projection",
    ):
        assert full.unet[key] == tiny.unet[key], key
    assert full.te1["num_hidden_layers"] == tiny.te1["num_hidden_layers"] == 12
    assert full.te2["num_hidden_layers"] == tiny.te2["num_hidden_layers"] == 32
    assert len(full.vae["block_out_channels"]) == len(tiny.vae["block_out_channels"])


def test_sgm_to_diffusers_to_sgm_is_identity(tiny_path):
    model = load_sdxl(tiny_path, dtype=torch.float16, vae_dtype=torch.float16)
    with tensorfile.TensorFile(tiny_path) as tf:
        original = tf.read_all()
    back = {}
    for name in COMPONENTS:
        module = model.component(name)
        back.update(component_map(name, model.config, module).to_sgm(module.state_dict()))
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


# ---------------------------------------------------------------- the map at full size


@pytest.fixture(scope="module")
def full_maps():
    config = sdxl_config()
    modules = build_empty(config)
    return config, modules, {n: component_map(n, config, m) for n, m in modules.items()}


def test_full_size_map_is_complete_both_ways(full_maps):
    _, modules, maps = full_maps
    # Counts of a real SDXL single file (without logit_scale and position_ids, which no module holds).
    expected = {"unet": 1680, "vae": 248, "te1": 196, "te2": 389}
    for name, module in modules.items():
        cmap = maps[name]
        keys = set(module.state_dict())
        assert set(cmap.by_diffusers) == keys, name  # every diffusers tensor mapped, nothing extra
        assert len(cmap.by_sgm) == expected[name], name
        for sgm, entry in cmap.by_sgm.items():  # and back
            assert all(cmap.by_diffusers[d].sgm == sgm for d in entry.diffusers)


LDM_PATTERNS = {
    "unet": r"model\.diffusion_model\.(time_embed\.[02]|label_emb\.0\.[02]|out\.[02]|input_blocks\.\d+\.\d+|middle_block\.[012]|output_blocks\.\d+\.\d+)\.",
    "vae": r"first_stage_model\.(quant_conv|post_quant_conv|(encoder|decoder)\.(conv_in|conv_out|norm_out|mid\.(block_[12]|attn_1)|down\.\d\.(block\.\d|downsample)|up\.\d\.(block\.\d|upsample)))\.",
    "te1": r"conditioner\.embedders\.0\.transformer\.text_model\.(embeddings|encoder\.layers\.\d+|final_layer_norm)\.",
    "te2": r"conditioner\.embedders\.1\.model\.(token_embedding\.weight|positional_embedding|text_projection|ln_final\.|transformer\.resblocks\.\d+\.(ln_[12]|attn\.(in_proj_weight|in_proj_bias|out_proj)|mlp\.c_(fc|proj)))",
}


def test_full_size_sgm_names_are_ldm_names(full_maps):
    _, _, maps = full_maps
    for name, cmap in maps.items():
        bad = [k for k in cmap.by_sgm if not re.match(LDM_PATTERNS[name], k)]
        assert not bad, (name, bad[:5])
    unet = maps["unet"].by_sgm
    for key in (
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight",
        "model.diffusion_model.label_emb.0.0.weight",
    ):
        assert key in unet, key
    te2 = maps["te2"].by_sgm["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"]
    assert te2.op == "qkv" and [d.rsplit(".", 2)[1] for d in te2.diffusers] == ["q_proj", "k_proj", "v_proj"]
    assert maps["vae"].by_sgm["first_stage_model.decoder.up.0.block.2.conv1.weight"].diffusers == (
        "decoder.up_blocks.3.resnets.2.conv1.weight",
    )


def test_te2_fused_projection_splits_in_qkv_order():
    cmap = keymap.te2_map(
        [f"text_model.encoder.layers.0.self_attn.{p}_proj.weight" for p in "qkv"] + ["text_projection.weight"]
    )
    fused = torch.arange(12.0).reshape(6, 2)
    parts = dict(
        cmap.to_diffusers("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", fused)
    )
    assert torch.equal(parts["text_model.encoder.layers.0.self_attn.q_proj.weight"], fused[:2])
    assert torch.equal(parts["text_model.encoder.layers.0.self_attn.k_proj.weight"], fused[2:4])
    assert torch.equal(parts["text_model.encoder.layers.0.self_attn.v_proj.weight"], fused[4:])
    proj = torch.arange(6.0).reshape(2, 3)
    ((_, t),) = cmap.to_diffusers("conditioner.embedders.1.model.text_projection", proj)
    assert torch.equal(t, proj.t())


# ---------------------------------------------------------------- the recipe's LoCon module set


def _layout(names):
    blocks = collections.Counter()
    passthrough = 0
    for n in names:
        m = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", n)
        if m:
            blocks[
                (["input_blocks", "middle_block", "output_blocks"].index(m.group(1)), int(m.group(2)))
            ] += 3
        else:
            passthrough += 3
    return [blocks[k] for k in sorted(blocks)], passthrough


def test_locon_module_set_has_the_seed_layout(tiny_model):
    from loradrop.engine.recipe import Recipe
    from loradrop.engine.train.network import LoConNetwork

    net = LoConNetwork(tiny_model, Recipe())
    comps = collections.Counter(net.components.values())
    assert comps == {"unet": 788, "te1": 24, "te2": 64}
    assert _layout(net.loras.keys()) == (SEED_LAYOUT, 264)
    assert all(
        n.startswith(("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"))
        and n.endswith(("mlp_fc1", "mlp_fc2"))
        for n, c in net.components.items()
        if c != "unet"
    )


def test_full_size_locon_names_have_the_seed_layout(full_maps):
    """The same module set named at full size (meta modules, no weights, no adapters built)."""
    from loradrop.engine.train.network import UNET_TARGETS

    config, modules, _ = full_maps
    names = keymap.UNetNames(config.unet)
    lora = set()
    for path, block in modules["unet"].named_modules():
        if type(block).__name__ in UNET_TARGETS:
            for sub, layer in block.named_modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    lora.add(keymap.lora_name("unet", f"{path}.{sub}", names))
    for comp in ("te1", "te2"):
        for path, layer in modules[comp].named_modules():
            if re.search(r"mlp\.fc[12]$", path):
                lora.add(keymap.lora_name(comp, path))
    assert len(lora) == 788 + 88
    assert _layout(lora) == (SEED_LAYOUT, 264)


# ---------------------------------------------------------------- bad input


def _write(path, keys, metadata=None):
    tensorfile.write(path, {k: torch.zeros(2) for k in keys}, metadata)
    return path


@pytest.mark.parametrize(
    "keys, words",
    [
        (
            [
                "model.diffusion_model.input_blocks.0.0.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            ],
            "Stable Diffusion 1.x",
        ),
        (
            ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.ln_final.weight"],
            "Stable Diffusion 2.x",
        ),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux"),
        (
            [
                "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight",
                "lora_unet_input_blocks_1_0_in_layers_2.alpha",
            ],
            "LoRA",
        ),
        (
            [
                "model.diffusion_model.input_blocks.0.0.weight",
                "conditioner.embedders.0.model.ln_final.weight",
            ],
            "refiner",
        ),
        (["some.other.weight"], "not an SDXL checkpoint"),
    ],
)
def test_wrong_model_kinds_are_named(tmp_path, keys, words):
    path = _write(tmp_path / "model.safetensors", keys)
    with pytest.raises(UserError) as e:
        load_sdxl(path)
    assert words in str(e.value) and str(path) in str(e.value)


def test_not_safetensors_truncated_and_missing(tmp_path, tiny_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a checkpoint at all")
    pickle_ckpt = tmp_path / "model.ckpt"
    pickle_ckpt.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(tiny_path.read_bytes()[:5_000_000])
    cases = {
        text: "not a safetensors file",
        pickle_ckpt: "pickle checkpoint",
        truncated: "truncated",
        tmp_path / "nowhere.safetensors": "does not exist",
    }
    for path, words in cases.items():
        with pytest.raises(UserError) as e:
            load_sdxl(path)
        assert words in str(e.value) and str(path) in str(e.value)


def test_incomplete_checkpoint_names_what_is_missing(tmp_path, tiny_path):
    with tensorfile.TensorFile(tiny_path) as tf:
        tensors = tf.read_all()
        meta = tf.metadata
    del tensors["model.diffusion_model.out.2.weight"]
    path = tmp_path / "partial.safetensors"
    tensorfile.write(path, tensors, meta)
    with pytest.raises(UserError, match="lacks 1 tensors of SDXL's UNet .*out.2.weight"):
        load_sdxl(path)


def test_bad_model_on_the_command_line_is_one_sentence(tmp_path):
    import subprocess
    import sys

    bad = _write(tmp_path / "flux.safetensors", ["double_blocks.0.img_attn.qkv.weight"])
    data = make_dataset(tmp_path / "data")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "loradrop",
            "train",
            str(data),
            "-o",
            str(tmp_path / "out"),
            "--model",
            str(bad),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("loradrop:")]
    assert len(errors) == 1 and "Flux" in errors[0] and "Traceback" not in r.stderr


def test_diffusers_folder_loads(tmp_path, tiny_model):
    from diffusers import StableDiffusionXLPipeline

    from loradrop.engine.models.configs import tokenizers

    tok1, tok2 = tokenizers()
    pipe = StableDiffusionXLPipeline(
        vae=tiny_model.vae,
        text_encoder=tiny_model.te1,
        text_encoder_2=tiny_model.te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=tiny_model.unet,
        scheduler=_scheduler(tiny_model),
    )
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_sdxl(tmp_path / "pipe")
    for name in COMPONENTS:
        a, b = loaded.component(name).state_dict(), tiny_model.component(name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.vae_id


def _scheduler(model):
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler.from_config(model.config.scheduler)


def test_read_all_takes_any_layout_and_refuses_a_cut_file(tmp_path):
    """Tensors as another writer may lay them out: an fp32 tensor at an odd offset, an empty one."""
    import json
    import struct

    parts = {
        "a": torch.tensor([1.5], dtype=torch.float16),
        "b": torch.arange(3, dtype=torch.float32) / 7,
        "c": torch.zeros(0, 4),
    }
    header, payload = {"__metadata__": {"k": "v"}}, b""
    for key, t in parts.items():
        data = t.numpy().tobytes()
        header[key] = {
            "dtype": {torch.float16: "F16", torch.float32: "F32"}[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [len(payload), len(payload) + len(data)],
        }
        payload += data
    head = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + payload)
    with tensorfile.TensorFile(path) as tf:
        got = tf.read_all()
    assert got.keys() == parts.keys() and all(
        torch.equal(got[k], parts[k]) and got[k].dtype == parts[k].dtype for k in parts
    )
    with tensorfile.TensorFile(path) as tf:
        assert tf.read_all(torch.float64)["b"].dtype == torch.float64
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match="is truncated"):
        tensorfile.TensorFile(path).read_all()
    empty_head = json.dumps({"e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}}).encode()
    path.write_bytes(struct.pack("<Q", len(empty_head)) + empty_head)  # no payload at all
    with tensorfile.TensorFile(path) as tf:
        assert tf.read_all()["e"].shape == (0, 4)
