"""The LyCORIS adapter kinds besides LoCon: LoHa, LoKr (factored and full-matrix) and DoRA.

For each kind, on the tiny twin: the network builds lycoris' module with the recipe's dims, its
training forward is lycoris' own forward, the file it saves holds the loaders' key names and the
same change as the adapter in memory (read back by loradrop's own reader), and a short run goes
through train → resize → chop → diffusers. diffusers 0.42 loads neither a LoHa nor a LoKr (it
raises on keys it cannot rename) and drops a DoRA's dora_scale (with a warning), so the files it
gets are the resized ones: resize writes every kind as a plain LoCon.

lycoris-lora 4.1.3's get_diff_weight applies alpha/rank twice for LoHa and LoKr; its forward and
every loader apply it once (get_weight), so the known answers here are get_weight and its forward.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from loradrop.engine import tensorfile
from loradrop.engine.data.dataset import scan
from loradrop.engine.kohya_args import convert_kohya
from loradrop.engine.lora.apply import apply_lora, lora_targets
from loradrop.engine.lora.blocks import layout
from loradrop.engine.lora.chop import chop
from loradrop.engine.lora.lorafile import read_lora, save_lora_payload
from loradrop.engine.lora.resize import resize
from loradrop.engine.models.sdxl import load_sdxl
from loradrop.engine.recipe import Recipe
from loradrop.engine.train.loop import train
from loradrop.engine.train.network import LoConNetwork
from loradrop.errors import UserError
from loradrop.testing import TINY_RECIPE, diffusers_pipeline, make_dataset

CPU = torch.device("cpu")
KINDS = {
    "loha": {"algo": "loha"},
    "loha tucker": {"algo": "loha", "use_tucker": True},
    "lokr": {"algo": "lokr"},
    "lokr factored": {"algo": "lokr", "network_dim": 1, "conv_dim": 1, "factor": 8, "decompose_both": True},
    "lokr full matrix": {"algo": "lokr", "full_matrix": True},
    "dora": {"algo": "locon", "dora_wd": True},
    "loha dora per row": {"algo": "loha", "dora_wd": True, "wd_on_output": True},
}
TRAINED = ["loha", "lokr", "lokr full matrix", "dora"]  # through the whole chain
EVERY_OTHER = "1," + ",".join("1" if i % 2 else "0" for i in range(20))
FRACTIONAL = "1," + ",".join(("0.5", "1", "0", "0.25")[i % 4] for i in range(20))

# The part names each loader reads per module (besides `alpha` and `dora_scale`, which all read):
# ComfyUI comfy/weight_adapter/lora.py (LoRAAdapter.load), loha.py (LoHaAdapter.load), lokr.py
# (LoKrAdapter.load), comfy/lora.py (load_lora: "{x}.alpha", "{x}.dora_scale"); A1111
# extensions-builtin/Lora/network_lora.py, network_hada.py (ModuleTypeHada: all four hada_w*),
# network_lokr.py (ModuleTypeLokr: lokr_w1 or lokr_w1_a+b, and lokr_w2 or lokr_w2_a+b),
# network.py (NetworkModule: weights.w["alpha"], weights.w.get("dora_scale")).
LOADERS_READ = {
    "locon": {"lora_up.weight", "lora_down.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
}


def recipe(kind: str, **more) -> Recipe:
    return Recipe.from_mapping({**TINY_RECIPE, **KINDS[kind], **more})


# ------------------------------------------------------------------ the network in memory


@pytest.fixture(scope="module")
def model(tiny_path):
    return load_sdxl(tiny_path)


@pytest.fixture(scope="module")
def networks(model, tmp_path_factory):
    """kind → (network with every tensor moved off its initial value, its file as the trainer writes it)."""
    tmp = tmp_path_factory.mktemp("adapters")
    out = {}
    for kind in KINDS:
        torch.manual_seed(0)
        net = LoConNetwork(model, recipe(kind))
        net.place(CPU)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # the initial ΔW is zero (one factor starts at 0): give every factor a value
            for name, p in net.named_parameters():
                p.add_(
                    torch.randn(p.shape, generator=g)
                    * (0.05 * p.abs() if name.endswith("dora_scale") else 0.05)
                )
        path = tmp / f"{kind}.safetensors"
        save_lora_payload(
            path, tensorfile.Layout({k: (torch.float32, net.shapes[k]) for k in net.keys}), net.snapshot()
        )
        out[kind] = (net, path)
    return out


def lycoris_change(lora: nn.Module) -> torch.Tensor:
    """What the lycoris module's own forward adds to its layer's weight, as (out × in·kh·kw)."""
    layer = lora.org_module[0]
    update = (
        lora.make_weight() * lora.scale if lora.name == "locon" else lora.get_weight(lora.shape)
    ).reshape(layer.weight.shape)
    if not lora.wd:
        return update.flatten(1)
    return (lora.apply_weight_decompose(layer.weight + update) - layer.weight).flatten(1)


def layer_inputs(layer: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    shape = (2, layer.in_features) if isinstance(layer, nn.Linear) else (2, layer.in_channels, 8, 8)
    return torch.randn(shape, generator=g)


def apply_change(layer: nn.Module, x: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """A loader's view: the layer with its weight plus a file's change."""
    weight = layer.weight + change.reshape(layer.weight.shape)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, layer.bias)


@pytest.mark.parametrize("kind", KINDS)
def test_the_network_builds_lycoris_module_of_the_kind_with_the_recipes_dims(kind, networks):
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    net, _ = networks[kind]
    r = recipe(kind)
    cls = {"locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}[r.algo]
    assert len(net.loras) == 876 and all(type(lora) is cls for lora in net.loras.values())
    for lora in net.loras.values():
        layer = lora.org_module[0]
        conv = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
        assert lora.lora_dim == (r.conv_dim if conv else r.network_dim) and float(lora.alpha) in (
            r.conv_alpha,
            r.network_alpha,
            lora.lora_dim,
        )
        assert lora.wd == r.dora_wd and (not lora.wd or lora.wd_on_out == r.wd_on_output)
    if r.algo == "lokr":
        full = [lora.use_w1 and lora.use_w2 for lora in net.loras.values()]
        assert all(full) if r.full_matrix else not all(full)
        assert (
            any(not lora.use_w1 for lora in net.loras.values()) == r.decompose_both
        )  # lokr_w1_a/b where the split allows it
    if r.use_tucker:
        assert any(lora.tucker for lora in net.loras.values())


@pytest.mark.parametrize("kind", KINDS)
def test_the_file_holds_the_change_of_the_adapter_in_memory(kind, networks):
    """The known answer: loradrop's reader on the saved file gives every module the change
    lycoris' module makes (a DoRA's W' − W against the layer's weight)."""
    net, path = networks[kind]
    lf = read_lora(path)
    assert set(lf.names) == set(net.loras)
    with torch.no_grad():
        for name, lora in net.loras.items():
            layer = lora.org_module[0]
            ours = lf.module(name).delta(base=layer.weight)
            theirs = lycoris_change(lora)
            assert ours.shape == theirs.shape and float((ours - theirs).norm() / theirs.norm()) < 1e-5, name
            if lora.wd:  # not a bypass add: the change is not the update alone
                assert float((lf.module(name).update() - theirs).norm() / theirs.norm()) > 1e-3, name


@pytest.mark.parametrize("kind", KINDS)
def test_the_training_forward_is_lycoris_forward_and_the_files(kind, networks):
    """Every wrapped layer's lean forward gives lycoris' own forward (bypass, or for a DoRA its
    rebuild forward), and the file's change applied to the layer as a loader does."""
    net, path = networks[kind]
    lf = read_lora(path)
    net.apply_to()
    try:
        with torch.no_grad():
            for name, lora in net.loras.items():
                layer = lora.org_module[0]
                x = layer_inputs(layer)
                ours, theirs = layer(x), lora.forward(x)
                loaded = apply_change(layer, x, lf.module(name).delta(base=layer.weight))
                effect = (theirs - layer.__class__.forward(layer, x)).abs().max()
                assert effect > 1e-4, name  # the adapter does something
                assert float((ours - theirs).abs().max() / effect) < 1e-4, name
                assert float((loaded - theirs).abs().max() / effect) < 1e-4, name
    finally:
        net.restore()
    assert all("forward" not in lora.org_module[0].__dict__ for lora in net.loras.values())


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora", "loha dora per row"])
def test_apply_patches_each_layer_with_its_modules_change(kind, networks, model):
    """The engine's apply (previews, the effect analysis) gives a layer W + its change, a DoRA's
    decomposed weight included, and takes it off again bit for bit."""
    net, path = networks[kind]
    targets = lora_targets(model)
    before = {name: targets[name].weight.detach().clone() for name in net.loras}
    with torch.no_grad():
        changes = {name: lycoris_change(lora).reshape(before[name].shape) for name, lora in net.loras.items()}
        with apply_lora(model, path):
            for name, change in changes.items():
                assert (
                    float((targets[name].weight - before[name] - change).abs().max() / change.abs().max())
                    < 1e-4
                ), name
    assert all(torch.equal(targets[name].weight, before[name]) for name in net.loras)


@pytest.mark.parametrize("kind", KINDS)
def test_the_file_uses_the_key_names_comfyui_and_a1111_read(kind, networks):
    _, path = networks[kind]
    r = recipe(kind)
    by_module: dict[str, set[str]] = {}
    for key in load_file(str(path)):
        name, part = key.split(".", 1)
        by_module.setdefault(name, set()).add(part)
    for name, parts in by_module.items():
        assert "alpha" in parts and ("dora_scale" in parts) == r.dora_wd, name
        assert parts - {"alpha", "dora_scale"} <= LOADERS_READ[r.algo], name
        if r.algo == "loha":
            assert {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts, name
        if r.algo == "lokr":
            for half in ("lokr_w1", "lokr_w2"):
                assert (half in parts) != ({f"{half}_a", f"{half}_b"} <= parts), name


def test_dora_scale_has_the_axis_the_recipe_asks_for(networks):
    """Per input column (1 × in …) by default, which A1111's apply_weight_decompose and ComfyUI's
    weight_decompose both normalise as LyCORIS does; per output row (out × 1 …) with wd_on_output."""
    for kind, rows in (("dora", False), ("loha dora per row", True)):
        net, path = networks[kind]
        tensors = load_file(str(path))
        for name, lora in net.loras.items():
            shape = tensors[name + ".dora_scale"].shape
            out, cin = lora.org_module[0].weight.shape[:2]
            assert tuple(shape[:2]) == ((out, 1) if rows else (1, cin)), name


# ------------------------------------------------------------------ train → resize → chop → diffusers


@pytest.fixture(scope="module")
def runs(model, tiny_path, tmp_path_factory):
    """kind → (trained, resized, chopped) files of a two-update run."""
    tmp = tmp_path_factory.mktemp("runs")
    data = make_dataset(tmp / "data", images=2)
    out = {}
    for kind in TRAINED:
        r = recipe(kind, max_train_steps=2, save_every_n_steps=0, output_name=kind.replace(" ", "-"))
        trained = train(
            model, scan(data, r), tmp / "out", r, device=CPU, cache_dir=tmp / "cache", emit=lambda *_: None
        ).final
        # Full rank and fp32: the resized LoCon must hold the trained change exactly.
        resized = resize(tiny_path, trained, "fro_ckpt=1,thr=-20", tmp / "resized", dtype="fp32").path
        out[kind] = (trained, resized, chop(resized, EVERY_OTHER, tmp / f"{kind}-chop.safetensors").path)
    return out


@pytest.mark.parametrize("kind", TRAINED)
def test_training_moves_the_adapters_and_the_metadata_names_the_kind(kind, runs):
    trained, *_ = runs[kind]
    r = recipe(kind)
    lf = read_lora(trained)
    assert {lf.module(n).kind for n in lf.names} == {r.algo} and len(lf.names) == 876
    assert max(lf.module(n).norm() for n in lf.names) > 1e-4  # the update left its zero start
    meta = lf.metadata
    args = json.loads(meta["ss_network_args"])
    assert (
        meta["ss_network_module"] == "lycoris.kohya"
        and args["algo"] == r.algo
        and args["dora_wd"] == str(r.dora_wd)
    )
    assert args["full_matrix"] == str(r.full_matrix)


@pytest.mark.parametrize("kind", TRAINED)
def test_resize_writes_the_trained_change_as_a_locon(kind, runs, model):
    trained, resized, _ = runs[kind]
    source, result = read_lora(trained), read_lora(resized)
    targets = lora_targets(model)
    assert {result.module(n).kind for n in result.names} == {"locon"} and not any(
        result.module(n).dora_scale is not None for n in result.names
    )
    assert set(result.names) <= set(source.names)
    for name in source.names:
        weight = targets[name].weight
        change = source.module(name).delta(base=weight)
        if name not in result.names:  # all zeroes, dropped
            assert float(change.abs().max()) < 1e-6, name
            continue
        assert float((result.module(name).delta() - change).norm() / change.norm()) < 1e-4, name


def test_resize_cuts_a_loha_by_the_recipe(runs, tiny_path, tmp_path):
    trained, resized, _ = runs["loha"]
    target = (
        0.25 * sum(t.numel() * t.element_size() for t in load_file(str(resized)).values()) / 2**20
    )  # half the fp32 full rank, in fp16
    cut = resize(tiny_path, trained, f"fro_ckpt=1,size={target:.4f}", tmp_path)
    written = sum(t.numel() * t.element_size() for t in load_file(str(cut.path)).values())
    assert 0.9 < written / (target * 2**20) < 1.01  # the factors fit the target (alphas aside)
    assert sum(r[1] for r in cut.ranks.values()) < sum(r[0] for r in cut.ranks.values())


@pytest.mark.parametrize("kind", TRAINED)
def test_chop_keeps_the_blocks_of_every_kind(kind, runs):
    trained, resized, chopped = runs[kind]
    lay = layout(load_file(str(trained)))
    assert len(lay.blocks) == 20  # the seed's block layout, whatever the kind
    kept = read_lora(chopped)
    assert len(layout(kept.tensors).blocks) == 10
    whole = read_lora(resized)
    for name in kept.names:
        a, b = kept.module(name).delta(), whole.module(name).delta()
        assert float((a - b).norm() / b.norm().clamp_min(1e-12)) < 1e-3, name


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr full matrix"])
def test_a_fractional_chop_scales_one_factor_of_a_loha_or_lokr(kind, runs, tmp_path):
    """A block weight w scales ΔW by w: one tensor per module is rewritten (a LoHa's hada_w1_a,
    never both Hadamard halves; a LoKr's first Kronecker half), the others are copied bit for bit."""
    trained, *_ = runs[kind]
    out = chop(trained, FRACTIONAL, tmp_path / "frac.safetensors")
    source, result = read_lora(trained), read_lora(out.path)
    lay = layout(source.tensors)
    weights = [float(v) for v in FRACTIONAL.split(",")[1:]]
    for name in result.names:
        block = lay.index_of(name)
        w = 1.0 if block is None else weights[block]
        a, b = result.module(name).delta(), source.module(name).delta()
        assert float((a - w * b).norm() / b.norm().clamp_min(1e-12)) < 2e-3, name
        changed = [k for k in result.keys_of(name) if not torch.equal(result.tensors[k], source.tensors[k])]
        assert len(changed) == (w != 1.0), (name, changed)
        if changed:
            assert changed[0].endswith((".hada_w1_a", ".lokr_w1", ".lokr_w1_a")), changed


def test_a_dora_chops_only_to_whole_blocks(runs, tmp_path):
    trained, *_ = runs["dora"]
    with pytest.raises(UserError, match="is a DoRA, whose change is not linear") as e:
        chop(trained, FRACTIONAL, tmp_path / "frac.safetensors")
    assert "\n" not in str(e.value) and str(trained) in str(e.value)
    result = read_lora(chop(trained, EVERY_OTHER, tmp_path / "half.safetensors").path)
    assert all(result.module(n).dora_scale is not None for n in result.names)


@pytest.fixture(scope="module")
def pipe(tiny_path):

    m = load_sdxl(tiny_path)
    pipeline = diffusers_pipeline(m)
    return pipeline, lora_targets(m)


def loaded_changes(pipeline, by_layer) -> dict[str, torch.Tensor]:
    """What diffusers (peft) adds to each layer it adapted, by kohya module name."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for component in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2):
        for layer in component.modules():
            if isinstance(layer, LoraLayer):
                (adapter,) = layer.lora_A
                with torch.no_grad():
                    out[by_layer[id(layer.base_layer)]] = (
                        layer.scaling[adapter]
                        * layer.lora_B[adapter].weight.flatten(1)
                        @ layer.lora_A[adapter].weight.flatten(1)
                    )
    return out


@pytest.mark.parametrize("kind", TRAINED)
def test_diffusers_loads_the_resized_and_chopped_file_of_every_kind(kind, runs, pipe):
    _, _, chopped = runs[kind]
    pipeline, targets = pipe
    by_layer = {id(layer): name for name, layer in targets.items()}
    lf = read_lora(chopped)
    pipeline.load_lora_weights(str(chopped))
    try:
        changes = loaded_changes(pipeline, by_layer)
    finally:
        pipeline.unload_lora_weights()
    assert set(changes) == set(lf.names)
    for name, theirs in changes.items():
        ours = lf.module(name).delta()
        assert float((theirs - ours).norm() / ours.norm().clamp_min(1e-30)) < 1e-4, name


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr full matrix"])
def test_diffusers_refuses_a_loha_or_lokr_file(kind, runs, pipe):
    """diffusers' kohya conversion only renames lora_down/lora_up keys and raises on the rest
    (lora_conversion_utils._convert_non_diffusers_lora_to_diffusers)."""
    trained, *_ = runs[kind]
    with pytest.raises(ValueError, match="have not been correctly renamed"):
        pipe[0].load_lora_weights(str(trained))
    pipe[0].unload_lora_weights()


def test_diffusers_drops_a_doras_magnitude(runs, pipe, model):
    """diffusers filters dora_scale out of a kohya DoRA (with a warning) and loads the rest as a
    LoCon: it applies the update, not the DoRA's change. Its resized file loads right (above)."""
    trained, *_ = runs["dora"]
    pipeline, targets = pipe
    lf = read_lora(trained)
    pipeline.load_lora_weights(str(trained))
    try:
        changes = loaded_changes(pipeline, {id(layer): name for name, layer in targets.items()})
    finally:
        pipeline.unload_lora_weights()
    assert set(changes) == set(lf.names)
    off = 0.0
    for name, theirs in changes.items():
        module = lf.module(name)
        update = module.update()
        assert float((theirs - update).norm()) <= 1e-3 * float(update.norm()), name
        change = module.delta(base=targets[name].weight)
        off = max(off, float((theirs - change).norm() / change.norm()))
    assert off > 0.01  # what diffusers applies is not the DoRA


def test_resize_refuses_a_dora_module_the_base_lacks(tmp_path, tiny_path):
    from safetensors.torch import save_file

    path = tmp_path / "dora.safetensors"
    name = "lora_unet_not_in_the_base"
    save_file(
        {
            f"{name}.lora_down.weight": torch.ones(2, 4),
            f"{name}.lora_up.weight": torch.ones(4, 2),
            f"{name}.dora_scale": torch.ones(1, 4),
        },
        str(path),
    )
    with pytest.raises(UserError, match="is a DoRA, whose change depends on the base weight") as e:
        resize(tiny_path, path, "fro_ckpt=1,thr=-3")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the recipe and from-kohya


def test_kohya_network_args_pick_the_kind():
    command = (
        "sdxl_train_network.py --network_module lycoris.kohya --network_dim 16 "
        '--network_args "algo=lokr" "factor=8" "full_matrix=True" "decompose_both=True" "use_tucker=True" "dora_wd=True"'
    )
    result = convert_kohya(command)
    r = result.recipe
    assert (r.algo, r.factor, r.full_matrix, r.decompose_both, r.use_tucker, r.dora_wd) == (
        "lokr",
        8,
        True,
        True,
        True,
        True,
    )
    assert r.wd_on_output and not result.unsupported  # LyCORIS' default axis, as the command meant
    assert any("wd_on_output=True" in n for n in result.notes)
    loha = convert_kohya(
        'sdxl_train_network.py --network_module lycoris.kohya --network_args "algo=loha"'
    ).recipe
    assert loha.algo == "loha" and not loha.dora_wd and not loha.wd_on_output


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (["use_tucker=true"], "use_tucker=true is not supported for algo locon"),
        (['algo="loha"', "factor=4"], "factor applies to algo lokr only"),
        (['algo="lokr"', "factor=0"], "factor must be -1"),
        (['algo="boft"'], "algo 'boft' is not supported; use one of locon, loha, lokr"),
        (['algo="loha"', "use_scalar=true"], "use_scalar=true is not supported"),
    ],
)
def test_recipe_refuses_what_the_kinds_cannot_do(settings, says):
    with pytest.raises(UserError, match=says):
        Recipe().with_overrides(settings)
