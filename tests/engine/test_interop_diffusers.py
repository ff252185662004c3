"""Files that load right in diffusers: every module at its own strength, and the twin as a single file.

diffusers (through peft) gives a kohya file one lora_alpha plus an alpha_pattern whose keys miss
its UNet attention and half of CLIP-L's modules, so a file whose alphas differ gets those modules
at the wrong strength. Each kind of file loradrop writes is loaded in a tiny pipeline and
checked module by module (peft's scaling · B·A against the file's (alpha / rank) · up · down),
and by the UNet's output against the engine's own block-weighted apply.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loradrop.engine.data.dataset import scan
from loradrop.engine.lora.apply import apply_lora, lora_targets
from loradrop.engine.lora.blocks import layout
from loradrop.engine.lora.chop import chop
from loradrop.engine.lora.lorafile import read_lora
from loradrop.engine.lora.resize import SCORES, resize
from loradrop.engine.models.sdxl import load_sdxl
from loradrop.engine.recipe import Recipe
from loradrop.engine.train.loop import train
from loradrop.testing import BUCKET_SIZES, TINY_RECIPE, conditioning_dims, diffusers_pipeline, make_dataset

CPU = torch.device("cpu")
# The seed's LoCon ranks (the twin's widths cap the 3x3 convs), one update.
RECIPE = {
    **TINY_RECIPE,
    "min_bucket_reso": 32,
    "conv_dim": 256,
    "conv_alpha": 4.0,
    "max_train_steps": 1,
    "save_every_n_steps": 0,
}
EVERY_OTHER = "1," + ",".join("1" if i % 2 else "0" for i in range(20))
FRACTIONAL = "1," + ",".join(("0.5", "1", "0", "0.25")[i % 4] for i in range(20))


@pytest.fixture(scope="module")
def files(tiny_path, tmp_path_factory):
    """kind → (LoRA file, the file and vector the engine applies for the same effect)."""
    tmp = tmp_path_factory.mktemp("interop")
    recipe = Recipe.from_mapping({**RECIPE, "output_name": "trained"})
    data = make_dataset(tmp / "data", images=2, sizes=BUCKET_SIZES)
    trained = train(
        load_sdxl(tiny_path),
        scan(data, recipe),
        tmp / "out",
        recipe,
        device=CPU,
        cache_dir=tmp / "cache",
        emit=lambda _event: None,
    ).final
    # 90% of the file's bytes: every score cuts hundreds of modules to a dozen different ranks.
    # (Not fewer: peft matches each module against every rank_pattern key with re.match, and
    # past re's 512-pattern cache each match recompiles: a load then takes a minute, not seconds.)
    size = 0.9 * sum(t.numel() * t.element_size() for t in load_file(str(trained)).values()) / 2**20
    out = {"trained": (trained, trained, None)}
    for score in SCORES:
        path = resize(tiny_path, trained, f"{score}=1,size={size:.4f}", tmp / score).path
        out[f"resized {score}"] = (path, path, None)
    by_size = resize(tiny_path, trained, f"fro_ckpt=1,size={size:.4f}", tmp / "thr-from").threshold
    thr = resize(tiny_path, trained, f"fro_ckpt=1,thr={by_size:.2f},rescale=0.8", tmp / "thr").path
    out["resized thr"] = (thr, thr, None)
    for kind, vector in (("chopped", EVERY_OTHER), ("fractional chop", FRACTIONAL)):
        out[kind] = (chop(thr, vector, tmp / f"{kind}.safetensors").path, thr, vector)
    return out


@pytest.fixture(scope="module")
def pipe(tiny_path):

    m = load_sdxl(tiny_path)
    pipeline = diffusers_pipeline(m)
    return pipeline, m


@pytest.fixture(scope="module")
def engine_model(tiny_path):
    return load_sdxl(tiny_path)


def unet_inputs(model):
    g = torch.Generator().manual_seed(0)
    width, pooled_width = conditioning_dims(model)
    x, ctx, pooled = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 77, width, generator=g),
        torch.randn(2, pooled_width, generator=g),
    )
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return x, torch.tensor([300, 600]), ctx, cond


KINDS = ["trained", *(f"resized {s}" for s in SCORES), "resized thr", "chopped", "fractional chop"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_module_gets_its_own_strength_in_diffusers(kind, files, pipe, engine_model):
    from peft.tuners.lora import LoraLayer

    path, source, vector = files[kind]
    pipeline, model = pipe
    lf = read_lora(path)
    assert len({float(lf.module(n).alpha) for n in lf.names}) == 1  # one alpha for the whole file
    by_layer = {id(layer): name for name, layer in lora_targets(model).items()}
    x, t, ctx, cond = unet_inputs(model)
    with torch.no_grad():
        base = model.unet(x, t, ctx, added_cond_kwargs=cond).sample
    pipeline.load_lora_weights(str(path))
    try:
        seen = set()
        for component in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2):
            for layer in component.modules():
                if not isinstance(layer, LoraLayer):
                    continue
                name = by_layer[id(layer.base_layer)]
                (adapter,) = layer.lora_A
                with torch.no_grad():
                    theirs = (
                        layer.scaling[adapter]
                        * layer.lora_B[adapter].weight.flatten(1)
                        @ layer.lora_A[adapter].weight.flatten(1)
                    )
                ours = lf.module(name).delta()
                assert float((theirs - ours).norm() / ours.norm().clamp_min(1e-30)) < 1e-4, name
                seen.add(name)
        assert seen == set(lf.names)
        with torch.no_grad():
            loaded = pipeline.unet(x, t, ctx, added_cond_kwargs=cond).sample
    finally:
        pipeline.unload_lora_weights()
    # The engine's block-weighted apply of the source gives the same UNet output (for a chop, the
    # source file at the chop's vector: entry 0 is 1, so the two tools read the vector alike).
    with torch.no_grad(), apply_lora(engine_model, source, vector):
        applied = engine_model.unet(x, t, ctx, added_cond_kwargs=cond).sample
    effect = (applied - base).abs().max()
    assert effect > 1e-3  # the LoRA does something
    assert float((loaded - applied).abs().max() / effect) < 2e-3


def test_the_fixture_files_differ_in_rank_and_blocks(files):
    """The files above are the cases that matter: resized modules of many ranks (with alpha per
    module, as resize_lora writes them, they would need alpha_pattern), chops that drop blocks."""
    for kind in KINDS:
        if kind.startswith("resized"):
            ranks = {
                t.shape[0]
                for k, t in load_file(str(files[kind][0])).items()
                if k.endswith(".lora_down.weight")
            }
            assert len(ranks) > 3, kind
    trained = layout(load_file(str(files["trained"][0])))
    assert len(layout(load_file(str(files["chopped"][0]))).blocks) == len(trained.blocks) // 2


def test_the_twin_loads_as_a_single_file_in_diffusers(tiny_path, tmp_path, monkeypatch):
    """StableDiffusionXLPipeline.from_single_file on the twin, offline, with the twin's own
    configs: each text encoder gets its own weights (diffusers tells them apart by width)."""
    from diffusers import StableDiffusionXLPipeline

    from loradrop.engine.models.configs import tiny_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tiny_config()
    folder = tmp_path / "config"
    parts = {
        "unet": ("config.json", config.unet),
        "vae": ("config.json", config.vae),
        "text_encoder": ("config.json", config.te1),
        "text_encoder_2": ("config.json", {**config.te2, "architectures": ["CLIPTextModelWithProjection"]}),
        "scheduler": ("scheduler_config.json", config.scheduler),
    }
    for sub, (name, values) in parts.items():
        (folder / sub).mkdir(parents=True)
        (folder / sub / name).write_text(json.dumps(values))
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionXLPipeline",
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": [None, None],
                "tokenizer_2": [None, None],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        )
    )
    pipeline = StableDiffusionXLPipeline.from_single_file(
        str(tiny_path), config=str(folder), local_files_only=True, tokenizer=None, tokenizer_2=None
    )
    sd = load_file(str(tiny_path))

    def param(module, suffix):
        (found,) = [p for n, p in module.state_dict().items() if n.endswith(suffix)]
        return found

    te1, te2 = pipeline.text_encoder, pipeline.text_encoder_2
    checks = [
        (
            param(te1, "encoder.layers.0.mlp.fc1.weight"),
            sd["conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"],
        ),
        (
            param(te1, "encoder.layers.11.self_attn.q_proj.weight"),
            sd["conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight"],
        ),
        (
            param(te2, "encoder.layers.0.mlp.fc1.weight"),
            sd["conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"],
        ),
        (
            param(te2, "encoder.layers.31.self_attn.q_proj.weight"),
            sd["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].chunk(3)[0],
        ),
        (param(te2, "text_projection.weight"), sd["conditioner.embedders.1.model.text_projection"].T),
        (
            param(pipeline.unet, "down_blocks.1.attentions.0.proj_in.weight"),
            sd["model.diffusion_model.input_blocks.4.1.proj_in.weight"],
        ),
    ]
    for got, want in checks:
        assert got.shape == want.shape and torch.equal(got.to(want.dtype), want)
