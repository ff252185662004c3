"""Resize against the base: kept ranks, the resulting ΔW, size mode, names, metadata, bad input.

The LoRA fixtures are built from orthonormal factors with chosen singular values, on real modules
of the tiny twin, so every expected number below is computed here from first principles.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from loradrop.engine import tensorfile
from loradrop.engine.lora.basekeys import BaseIndex
from loradrop.engine.lora.lorafile import kohya_tensors, lora_hashes, save_lora
from loradrop.engine.lora.resize import ResizeRecipe, format_float, resize
from loradrop.errors import UserError

# module → (base tensor, row block of a fused q/k/v tensor or None, rank)
MODULES = {
    "lora_unet_input_blocks_1_0_in_layers_2": (
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        None,
        16,
    ),
    "lora_unet_input_blocks_4_0_skip_connection": (
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        None,
        8,
    ),
    "lora_unet_input_blocks_4_1_proj_in": ("model.diffusion_model.input_blocks.4.1.proj_in.weight", None, 8),
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k": (
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        None,
        8,
    ),
    "lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_0_proj": (
        "model.diffusion_model.output_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
        None,
        8,
    ),
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": (
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        None,
        8,
    ),
    "lora_te2_text_model_encoder_layers_3_self_attn_k_proj": (
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight",
        1,
        8,
    ),
    "lora_te2_text_model_encoder_layers_5_mlp_fc2": (
        "conditioner.embedders.1.model.transformer.resblocks.5.mlp.c_proj.weight",
        None,
        8,
    ),
}
ALPHA = 4.0


@pytest.fixture(scope="module")
def base_weights(tiny_path):
    """The base weight of each module, in fp64, straight from the file."""
    sd = load_file(str(tiny_path))
    out = {}
    for name, (key, chunk, _) in MODULES.items():
        w = sd[key].double()
        out[name] = w if chunk is None else w.chunk(3)[chunk]
    return out


@pytest.fixture(scope="module")
def truth(base_weights):
    """Per module: U, σ (descending, ‖W‖·10^[-5, -1]), Vᵀ and the weight's input shape."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, (_, _, rank) in MODULES.items():
        w = base_weights[name]
        n, m = w.shape[0], math.prod(w.shape[1:])
        u = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
        exponents = torch.rand(rank, generator=g, dtype=torch.float64) * 4 - 5
        s = (torch.linalg.vector_norm(w) * 10**exponents).sort(descending=True).values
        out[name] = (u, s, v.T, tuple(w.shape[1:]))
    return out


def write_lora(path, truth, *, dtype=torch.float32, metadata=None, extra=None):
    tensors = {}
    for name, (u, s, vh, in_shape) in truth.items():
        tensors.update(
            kohya_tensors(name, u.float(), s.float(), vh.float(), in_shape, ALPHA / s.shape[0], dtype)
        )
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata=metadata)
    return path


def delta(tensors, name):
    down, up = tensors[name + ".lora_down.weight"].double(), tensors[name + ".lora_up.weight"].double()
    return float(tensors[name + ".alpha"]) / down.shape[0] * up.flatten(1) @ down.flatten(1)


@pytest.fixture(scope="module")
def lora(tmp_path_factory, truth):
    path = write_lora(tmp_path_factory.mktemp("lora") / "known.safetensors", truth)
    sd = load_file(str(path))
    for name, (u, s, vh, _) in truth.items():  # the fixture itself is what it claims
        torch.testing.assert_close(delta(sd, name), (u * s) @ vh, rtol=0, atol=1e-6 * float(s[0]))
    return path


def expected_scores(weights, rescale, truth, base_weights):
    total = sum(weights.values())
    w = {k: v / total for k, v in weights.items()}
    out = {}
    for name, (u, s, vh, _) in truth.items():
        base = base_weights[name].reshape(base_weights[name].shape[0], -1)
        score = torch.log10(s) + math.log10(rescale)
        score -= w.get("fro_ckpt", 0) * math.log10(torch.linalg.vector_norm(base))
        score -= w.get("spn_ckpt", 0) * math.log10(torch.linalg.matrix_norm(base, ord=2))
        score -= w.get("spn_lora", 0) * math.log10(s[0])
        score -= w.get("fro_lora", 0) * math.log10(torch.linalg.vector_norm(s))
        score -= w.get("params", 0) * math.log10(base.shape[0] + base.shape[1])
        if w.get("subspace", 0):
            score -= w["subspace"] * torch.log10(((u.T @ base) * vh).sum(1).abs())
        out[name] = score
    return out


def threshold_between(scores, at=0.5):
    """A threshold in a clear gap between two scores near the given quantile."""
    flat = torch.cat(list(scores.values())).sort().values
    i = int(at * len(flat))
    while flat[i + 1] - flat[i] < 0.02:
        i += 1
    return round(float(flat[i] + flat[i + 1]) / 2, 4)


RECIPES = [
    {"fro_ckpt": 1},
    {"spn_ckpt": 1},
    {"spn_lora": 1},
    {"fro_lora": 1},
    {"params": 1},
    {"subspace": 1},
    {"spn_ckpt": 0.5, "subspace": 0.5},
    {"fro_ckpt": 2, "params": 1},
]


@pytest.mark.parametrize("weights", RECIPES, ids=lambda w: "+".join(w))
def test_kept_ranks_follow_the_score_at_the_threshold(
    tmp_path, lora, truth, base_weights, tiny_path, weights
):
    rescale = 0.5 if "params" in weights else 1.0
    scores = expected_scores(weights, rescale, truth, base_weights)
    thr = threshold_between(scores)
    recipe = (
        ",".join(f"{k}={v}" for k, v in weights.items())
        + f",thr={thr}"
        + (f",rescale={rescale}" if rescale != 1 else "")
    )
    report = resize(tiny_path, lora, recipe, tmp_path)
    want = {name: int((s > thr).sum()) for name, s in scores.items()}
    assert {n: r[1] for n, r in report.ranks.items()} == want
    assert 0 < sum(want.values()) < sum(len(s) for s in scores.values())  # the threshold really cuts
    out = load_file(str(report.path))
    for name, k in want.items():
        if k:
            assert out[name + ".lora_down.weight"].shape[0] == k
        else:
            assert not any(key.startswith(name + ".") for key in out)


def test_delta_is_the_truncated_svd(tmp_path, lora, truth, base_weights, tiny_path):
    scores = expected_scores({"fro_ckpt": 1}, 0.5, truth, base_weights)
    thr = threshold_between(scores, 0.4)
    for dtype, tol in (("fp32", 1e-5), ("fp16", 2e-3)):
        report = resize(tiny_path, lora, f"fro_ckpt=1,thr={thr},rescale=0.5", tmp_path / dtype, dtype=dtype)
        out = load_file(str(report.path))
        for name, (u, s, vh, in_shape) in truth.items():
            keep = scores[name] > thr
            if not keep.any():
                continue
            assert (
                out[name + ".lora_down.weight"].dtype == {"fp32": torch.float32, "fp16": torch.float16}[dtype]
            )
            assert tuple(out[name + ".lora_down.weight"].shape[1:]) == in_shape  # convs stay convs
            assert out[name + ".lora_up.weight"].shape[2:] == (1, 1) * (len(in_shape) == 3)
            want = 0.5 * (u[:, keep] * s[keep]) @ vh[keep]
            torch.testing.assert_close(delta(out, name), want, rtol=0, atol=tol * float(s[0]))


def test_size_mode_lands_within_one_dimension_of_the_target(tmp_path, lora, truth, base_weights, tiny_path):
    scores = expected_scores({"fro_ckpt": 1}, 1.0, truth, base_weights)
    # every dimension, best first: (score, bytes in fp16, module)
    dims = sorted(
        (
            (float(sc), 2 * (u.shape[0] + vh.shape[1]), name)
            for name, (u, s, vh, _) in truth.items()
            for sc in scores[name]
        ),
        reverse=True,
    )
    target_mib = 0.01
    report = resize(tiny_path, lora, f"fro_ckpt=1,size={target_mib}", tmp_path)
    out = load_file(str(report.path))
    kept_bytes = sum(2 * t.numel() for k, t in out.items() if not k.endswith(".alpha"))
    kept = sum(r[1] for r in report.ranks.values())
    budget = target_mib * 2**20
    assert kept_bytes == sum(d[1] for d in dims[:kept]) <= budget
    assert kept_bytes + dims[kept][1] >= budget  # one more dimension would not fit
    assert collections.Counter(d[2] for d in dims[:kept]) == {
        n: r[1] for n, r in report.ranks.items() if r[1]
    }
    assert report.threshold == pytest.approx(dims[kept][0], abs=1e-5)
    assert report.path.name == f"known_frockpt1_size0.01_th{format_float(report.threshold)}.safetensors"


# resize_lora's size search (elias-gaeros/resize_lora, resize_lora.py at 00f1af4, in
# ResizeRecipe.resize_lora): l.133-147 sort every score descending, cumsum each dimension's
# bytes (loralib's dim_size: elem·(out + in·kh·kw)) and take the score at
# `torch.searchsorted(cum_sizes, target_size_bytes)`, the first total >= the target; l.156 keeps
# `layer_scores > threshold`, strictly, in fp32 on both sides; loralib's statedict writes
# nothing for a module left with no dimension (it is dropped, never kept at rank 1).


def test_size_threshold_at_a_modules_only_singular_value(tmp_path, truth, base_weights, tiny_path):
    """resize_lora's search: best first, the threshold is the score of the first dimension at
    which the running total reaches the target, and only scores strictly above it are kept. A
    rank-1 module whose one σ is that dimension is dropped when it would fit exactly (or not
    at all), and kept once the target has one byte more."""
    x = "lora_unet_input_blocks_4_1_proj_in"
    others = {n: t for n, t in truth.items() if n != x}
    scores = expected_scores({"fro_ckpt": 1}, 1.0, others, base_weights)
    cost = {
        n: 2 * (u.shape[0] + vh.shape[1]) for n, (u, _, vh, _) in truth.items()
    }  # fp16 bytes per dimension
    dims = sorted(((float(v), n) for n, sc in scores.items() for v in sc), reverse=True)
    # X's score goes midway into a wide gap near the middle, away from every other score.
    i = next(
        i
        for i in range(len(dims) // 2, len(dims) - 2)
        if dims[i][0] - dims[i + 1][0] > 0.05 and dims[i + 1][0] - dims[i + 2][0] > 0.02
    )
    at = (dims[i][0] + dims[i + 1][0]) / 2
    fro = float(torch.linalg.vector_norm(base_weights[x]))
    u, _, vh, in_shape = truth[x]
    lone = {**others, x: (u[:, :1], torch.tensor([fro * 10**at], dtype=torch.float64), vh[:1], in_shape)}
    src = write_lora(tmp_path / "lone.safetensors", lone)
    fits = sum(cost[n] for _, n in dims[: i + 1]) + cost[x]  # bytes of every dimension down to X's
    want = collections.Counter(n for _, n in dims[: i + 1])
    for budget, kept in ((fits - 1, False), (fits, False), (fits + 1, True)):
        report = resize(tiny_path, src, f"fro_ckpt=1,size={budget / 2**20!r}", tmp_path / str(budget))
        assert report.ranks[x] == (1, int(kept)), budget
        assert report.threshold == pytest.approx(dims[i + 1][0] if kept else at, abs=1e-5)
        assert {n: r[1] for n, r in report.ranks.items() if n != x and r[1]} == want
        out = load_file(str(report.path))
        assert sum(2 * t.numel() for k, t in out.items() if not k.endswith(".alpha")) == fits - cost[x] * (
            not kept
        )


def test_size_threshold_on_tied_scores_keeps_neither(tmp_path, truth, base_weights, tiny_path):
    """Two dimensions with the same score (a rank-2 module with σ₁ = σ₂ exactly) where the
    running total reaches the target: the threshold is their score and `>` keeps neither, even
    when the target leaves room for one of them; a byte more than both need keeps both."""
    x = "lora_unet_input_blocks_4_1_proj_in"
    others = {n: t for n, t in truth.items() if n != x}
    scores = expected_scores({"fro_ckpt": 1}, 1.0, others, base_weights)
    cost = {n: 2 * (u.shape[0] + vh.shape[1]) for n, (u, _, vh, _) in truth.items()}
    dims = sorted(((float(v), n) for n, sc in scores.items() for v in sc), reverse=True)
    i = next(
        i
        for i in range(len(dims) // 2, len(dims) - 2)
        if dims[i][0] - dims[i + 1][0] > 0.05 and dims[i + 1][0] - dims[i + 2][0] > 0.02
    )
    at = (dims[i][0] + dims[i + 1][0]) / 2
    w = base_weights[x]
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    # Axis-aligned factors: both columns of up and rows of down are the same number times a unit
    # vector, so QR and SVD give two bitwise-equal singular values, hence two equal scores.
    sigma = torch.full((2,), float(torch.linalg.vector_norm(w)) * 10**at, dtype=torch.float64)
    tied = {
        **others,
        x: (
            torch.eye(rows, 2, dtype=torch.float64),
            sigma,
            torch.eye(2, cols, dtype=torch.float64),
            tuple(w.shape[1:]),
        ),
    }
    src = write_lora(tmp_path / "tied.safetensors", tied)
    before = sum(cost[n] for _, n in dims[: i + 1])  # bytes of every dimension scoring above the pair
    want = collections.Counter(n for _, n in dims[: i + 1])
    for budget, rank in (
        (before + cost[x], 0),
        (before + cost[x] + 1, 0),
        (before + 2 * cost[x], 0),
        (before + 2 * cost[x] + 1, 2),
    ):
        report = resize(tiny_path, src, f"fro_ckpt=1,size={budget / 2**20!r}", tmp_path / str(budget))
        assert report.ranks[x] == (2, rank), budget
        assert report.threshold == pytest.approx(dims[i + 1][0] if rank else at, abs=1e-5)
        assert {n: r[1] for n, r in report.ranks.items() if n != x and r[1]} == want
        assert x + ".alpha" not in load_file(str(report.path)) or rank


def test_size_above_the_whole_lora_keeps_everything(tmp_path, lora, tiny_path):
    report = resize(tiny_path, lora, "fro_ckpt=1,size=100", tmp_path)
    assert report.threshold == -math.inf and report.path.name == "known_frockpt1_size100_th-inf.safetensors"
    assert all(a == b for a, b in report.ranks.values())


def test_name_and_metadata(tmp_path, truth, tiny_path):
    meta = {
        "ss_output_name": "known",
        "modelspec.title": "Known",
        "ss_network_dim": "8",
        "ss_network_alpha": "4",
        "sshs_model_hash": "stale",
    }
    src = write_lora(tmp_path / "my lora.safetensors", truth, metadata=meta)
    report = resize(tiny_path, src, "fro_ckpt=1,thr=-3.55")
    assert report.path == tmp_path / "my lora_frockpt1_th-3.55.safetensors"  # beside the input by default
    out = tensorfile.read_metadata(report.path)
    # The written file's name, not the input's ss_output_name (which every step file of a run
    # shares), so A1111 lists each resized file apart.
    assert out["ss_output_name"] == out["modelspec.title"] == "my lora_frockpt1_th-3.55"
    assert json.loads(out["resize_params"]) == {
        "recipe_str": "fro_ckpt=1,thr=-3.55",
        "weights": {
            "spn_lora": 0.0,
            "spn_ckpt": 0.0,
            "subspace": 0.0,
            "fro_lora": 0.0,
            "fro_ckpt": 1.0,
            "params": 0.0,
        },
        "target_size": None,
        "threshold": -3.55,
        "rescale": 1.0,
    }
    ranks = {r for r in (v[1] for v in report.ranks.values()) if r}
    assert out["ss_network_dim"] == ("Dynamic" if len(ranks) > 1 else str(ranks.pop()))
    data = report.path.read_bytes()
    assert (
        out["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    )
    assert out["sshs_model_hash"] != "stale"

    report = resize(tiny_path, src, "spn_ckpt=1,subspace=1,rescale=0.8,size=0.01", tmp_path / "o")
    assert (
        report.path.name
        == f"my lora_spnckpt0.5_subspace0.5_scale0.8_size0.01_th{format_float(report.threshold)}.safetensors"
    )


def test_dim_and_alpha_describe_the_result(tmp_path, truth, tiny_path):
    one = {"lora_unet_input_blocks_4_1_proj_in": truth["lora_unet_input_blocks_4_1_proj_in"]}
    report = resize(tiny_path, write_lora(tmp_path / "one.safetensors", one), "spn_lora=1,thr=-2.5")
    k = report.ranks["lora_unet_input_blocks_4_1_proj_in"][1]
    out = tensorfile.read_metadata(report.path)  # a file without metadata works too
    assert (out["ss_network_dim"], out["ss_network_alpha"]) == (str(k), str(ALPHA))  # one alpha: the input's
    assert "resize_params" in out and "sshs_legacy_hash" in out
    assert out["ss_output_name"] == "one_spnlora1_th-2.5" and out["ss_base_model_version"] == "sdxl_base_v1-0"


def test_kohya_hashes():
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(300_000, generator=g), "a": torch.randn(3, 5, generator=g).half()}
    meta = {"ss_network_dim": "8", "modelspec.title": "x"}
    model_hash, legacy_hash = lora_hashes(tensors, meta)
    data = save(tensors, {"ss_network_dim": "8"})  # kohya hashes the file with its ss_* metadata alone
    assert model_hash == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    assert legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert lora_hashes(tensors, {**meta, "modelspec.title": "y"}) == (model_hash, legacy_hash)
    assert (
        lora_hashes(tensors, {**meta, "ss_training_comment": "x" * 100})[1] != legacy_hash
    )  # moves the data


def test_layers_the_base_lacks_are_kept_unchanged_and_listed(tmp_path, truth, tiny_path, caplog):
    g = torch.Generator().manual_seed(3)
    stray = "lora_unet_output_blocks_9_0_in_layers_2"  # SDXL has output blocks 0-8
    extra = {
        stray + ".lora_down.weight": torch.randn(4, 16, generator=g).half(),
        stray + ".lora_up.weight": torch.randn(16, 4, generator=g).half(),
        stray + ".alpha": torch.tensor(2.0).half(),
    }
    src = write_lora(tmp_path / "stray.safetensors", truth, extra=extra)
    with caplog.at_level(logging.WARNING):
        report = resize(tiny_path, src, "fro_ckpt=1,thr=-3")
    assert report.unchanged == [stray] and any(stray in r.message for r in caplog.records)
    assert stray in "\n".join(report.lines())
    out = load_file(str(report.path))
    for key, t in extra.items():
        assert out[key].dtype == t.dtype
    # The same ΔW, written with the file's one alpha (its scale folded into lora_up).
    assert float(out[stray + ".alpha"]) == ALPHA and torch.equal(
        out[stray + ".lora_down.weight"], extra[stray + ".lora_down.weight"]
    )
    torch.testing.assert_close(delta(out, stray), delta(extra, stray), rtol=1e-3, atol=0)


def test_all_zero_modules_are_dropped(tmp_path, truth, tiny_path):
    name = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    src = write_lora(tmp_path / "z.safetensors", truth)
    sd = load_file(str(src))
    sd[name + ".lora_up.weight"].zero_()
    save_file(sd, str(src))
    report = resize(tiny_path, src, "fro_ckpt=1,thr=-9")
    assert report.zero == [name] and report.ranks[name] == (8, 0)
    assert not any(k.startswith(name) for k in load_file(str(report.path)))


def test_te2_fused_projection_splits_in_q_k_v_order(tiny_path, tiny_model):
    with tensorfile.TensorFile(tiny_path) as tf:
        index = BaseIndex(tf)
        layer = tiny_model.te2.text_model.encoder.layers[3].self_attn
        for part in "qkv":
            got = index.read(f"lora_te2_text_model_encoder_layers_3_self_attn_{part}_proj")
            assert torch.equal(got.float(), getattr(layer, f"{part}_proj").weight)


@pytest.mark.parametrize(
    ("recipe", "says"),
    [
        ("fro_ckpt=1,thr=-3,foo=2", "Unknown key 'foo'"),
        ("fro_ckpt=1,thr=abc", "'thr=abc'"),
        ("fro_ckpt=1", "needs a threshold"),
        ("thr=-3", "No score weight"),
        ("fro_ckpt=1,thr=", "'thr' needs a value"),
        ("fro_ckpt=1,thr=-1:spn_lora=1,thr=-1", "one recipe at a time"),
        ("fro_ckpt=1,size=-4", "must be positive"),
    ],
)
def test_bad_recipes_name_the_problem(recipe, says):
    with pytest.raises(UserError, match=says):
        ResizeRecipe.parse(recipe)


def test_recipe_reads_like_resize_lora():
    r = ResizeRecipe.parse("spn_ckpt, subspace=3, size=32")  # bare name = 1, spaces allowed
    assert (
        r.weights["spn_ckpt"] == 0.25
        and r.weights["subspace"] == 0.75
        and r.target_size == 32
        and r.threshold is None
    )
    assert ResizeRecipe.parse("fro_ckpt=1,thr=-3.55,size=8").fixed_threshold is None  # size wins


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        (["lora_unet_a.hada_w1_a", "lora_unet_a.hada_w1_b", "lora_unet_a.alpha"], "LoHa"),
        (
            ["lora_unet_a.lokr_w1", "lora_unet_a.alpha"],
            "LoKr",
        ),  # incomplete: no lokr_w2 (a whole LoKr resizes, tests/engine/test_adapters.py)
        (
            ["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.lora_mid.weight"],
            "Tucker",
        ),
        (["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.dora_scale"], "DoRA"),
        (
            [
                "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight",
                "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight",
            ],
            "diffusers/PEFT",
        ),
        (["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "1.x"),
        (["lora_unet_a.lora_down.weight", "lora_unet_a.weight_norm"], "not part of a kohya LoRA"),
    ],
)
def test_other_adapter_formats_are_refused_in_one_sentence(tmp_path, tiny_path, keys, says):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.ones(2, 2) for k in keys}, str(path))
    with pytest.raises(UserError, match=says) as e:
        resize(tiny_path, path, "fro_ckpt=1,thr=-3")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_lora_of_another_shape_is_refused(tmp_path, tiny_path):
    name = "lora_unet_input_blocks_4_1_proj_in"  # 32 × 32 in the twin
    path = tmp_path / "big.safetensors"
    save_lora(
        path,
        {
            name + ".lora_down.weight": torch.ones(4, 640),
            name + ".lora_up.weight": torch.ones(640, 4),
            name + ".alpha": torch.tensor(4.0),
        },
    )
    with pytest.raises(UserError, match="another model family"):
        resize(tiny_path, path, "fro_ckpt=1,thr=-3")
