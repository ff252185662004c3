"""Blocks: the seed's layout as chop_blocks prints it, energy, suggestions, vectors and presets."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loradrop.engine.lora.blocks import PRESETS, energy, layout, parse_vector, suggest
from loradrop.engine.lora.lorafile import kohya_tensors
from loradrop.errors import UserError

# The seed guide's chop_blocks output, line for line (its "INFO: " prefix and tab left out).
SEED_PRINTOUT = """\
Blocks layout:
  [ 0]  input_blocks.1 layers=9
  [ 1]  input_blocks.2 layers=9
  [ 2]  input_blocks.3 layers=3
  [ 3]  input_blocks.4 layers=78
  [ 4]  input_blocks.5 layers=75
  [ 5]  input_blocks.6 layers=3
  [ 6]  input_blocks.7 layers=318
  [ 7]  input_blocks.8 layers=315
  [ 8]  middle_block.0 layers=9
  [ 9]  middle_block.1 layers=306
  [10]  middle_block.2 layers=9
  [11] output_blocks.0 layers=318
  [12] output_blocks.1 layers=318
  [13] output_blocks.2 layers=321
  [14] output_blocks.3 layers=78
  [15] output_blocks.4 layers=78
  [16] output_blocks.5 layers=81
  [17] output_blocks.6 layers=12
  [18] output_blocks.7 layers=12
  [19] output_blocks.8 layers=12
Vector string : "1,INP01,INP02,INP03,INP04,INP05,INP06,INP07,INP08,MID00,MID01,MID02,OUT00,OUT01,OUT02,OUT03,OUT04,OUT05,OUT06,OUT07,OUT08"
Pass through layers: 264"""


@pytest.fixture(scope="module")
def seed_lora(tmp_path_factory, tiny_path):
    """A LoCon with the seed recipe's module set, as lycoris-lora builds it on the twin."""
    from lycoris import LycorisNetwork, create_lycoris

    from loradrop.engine.models import keymap
    from loradrop.engine.models.sdxl import load_sdxl

    model = load_sdxl(tiny_path, components=("unet", "te1", "te2"))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    with pytest.MonkeyPatch.context() as mp:  # lycoris keeps its preset on the class
        for component, targets, kwargs in (
            (
                "unet",
                ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
                {"conv_dim": 256, "conv_alpha": 4},
            ),
            ("te1", ["CLIPMLP"], {}),
            ("te2", ["CLIPMLP"], {}),
        ):
            mp.setattr(LycorisNetwork, "TARGET_REPLACE_MODULE", targets)
            mp.setattr(LycorisNetwork, "TARGET_REPLACE_NAME", [])
            root = model.component(component)
            net = create_lycoris(root, 1.0, linear_dim=8, linear_alpha=4, algo="locon", **kwargs)
            paths = {id(m): p for p, m in root.named_modules()}
            for lora in net.loras:
                name = keymap.lora_name(component, paths[id(lora.org_module[0])], model.unet_names)
                tensors[name + ".lora_down.weight"] = lora.lora_down.weight.detach().half()
                up = lora.lora_up.weight
                tensors[name + ".lora_up.weight"] = (torch.randn(up.shape, generator=g) * 0.01).half()
                tensors[name + ".alpha"] = torch.tensor(float(lora.alpha)).half()
    path = tmp_path_factory.mktemp("seed") / "seed.safetensors"
    save_file(tensors, str(path))
    return path


def test_the_seed_layout_is_printed_as_chop_blocks_prints_it(seed_lora):
    lay = layout(load_file(str(seed_lora)))
    assert "\n".join(lay.lines()) == SEED_PRINTOUT
    assert len({k.split(".")[0] for k in lay.passthrough}) == 88  # both text encoders' MLPs


def test_the_blocks_command_shows_the_seed_layout(seed_lora, capsys):
    from loradrop.cli import main

    assert main(["blocks", str(seed_lora)]) == 0
    out = capsys.readouterr().out.splitlines()
    want = SEED_PRINTOUT.splitlines()
    assert len(out) == len(want) and all(line.startswith(w) for line, w in zip(out, want))


def test_energy_of_the_seed_layout(seed_lora, tiny_path):
    report = energy(seed_lora, tiny_path)
    assert [b.tensors for b in report.blocks] == [
        9,
        9,
        3,
        78,
        75,
        3,
        318,
        315,
        9,
        306,
        9,
        318,
        318,
        321,
        78,
        78,
        81,
        12,
        12,
        12,
    ]
    assert report.relative and not report.no_base and report.passthrough.tensors == 264
    assert sum(report.shares) == pytest.approx(1.0)
    assert report.lines()[0] == "Blocks layout:" and "share=" in report.lines()[1]


# module → (σ values, in a block?)
KNOWN = {
    "lora_unet_input_blocks_4_1_proj_in": [3.0, 4.0],  # ‖ΔW‖ = 5
    "lora_unet_input_blocks_4_0_in_layers_2": [12.0, 5.0],  # 13, same block
    "lora_unet_output_blocks_1_1_proj_out": [1.0],  # 1
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": [6.0, 8.0],  # 10, passes through
}


@pytest.fixture(scope="module")
def known_lora(tmp_path_factory, tiny_path):
    from loradrop.engine import tensorfile
    from loradrop.engine.lora.basekeys import BaseIndex

    g = torch.Generator().manual_seed(1)
    tensors = {}
    with tensorfile.TensorFile(tiny_path) as tf:
        index = BaseIndex(tf)
        for name, sigmas in KNOWN.items():
            shape = index[name].shape
            k, m = len(sigmas), math.prod(shape[1:])
            u = torch.linalg.qr(torch.randn(shape[0], k, generator=g))[0]
            v = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
            tensors.update(kohya_tensors(name, u, torch.tensor(sigmas), v.T, shape[1:], 0.5, torch.float32))
    path = tmp_path_factory.mktemp("known") / "known.safetensors"
    save_file(tensors, str(path))
    return path


def test_energy_is_the_sum_of_frobenius_norms(known_lora, tiny_path):
    report = energy(known_lora)
    assert [(b.name, round(b.energy, 4)) for b in report.blocks] == [
        ("input_blocks.4", 18.0),
        ("output_blocks.1", 1.0),
    ]
    assert report.passthrough.energy == pytest.approx(10.0, rel=1e-5) and report.relative is False
    assert report.shares == pytest.approx([18 / 19, 1 / 19], rel=1e-5)

    base = load_file(str(tiny_path))
    norm = {
        n: float(base["model.diffusion_model." + k + ".weight"].double().norm())
        for n, k in (
            ("proj_in", "input_blocks.4.1.proj_in"),
            ("conv", "input_blocks.4.0.in_layers.2"),
            ("out", "output_blocks.1.1.proj_out"),
        )
    }
    rel = energy(known_lora, tiny_path)
    want = [5 / norm["proj_in"] + 13 / norm["conv"], 1 / norm["out"]]
    assert [b.relative for b in rel.blocks] == pytest.approx(want, rel=1e-5)
    assert rel.shares == pytest.approx([w / sum(want) for w in want], rel=1e-5)


def test_suggest_takes_the_largest_blocks_first():
    shares = [0.05, 0.5, 0.05, 0.3, 0.1]
    assert suggest(shares, 0.8) == [1, 0, 1, 0, 1, 0]
    assert suggest(shares, 0.81) == [1, 0, 1, 0, 1, 1]
    assert suggest(shares, 1.0) == [1, 1, 1, 1, 1, 1]
    assert suggest([0.0, 0.0], 0.5) == [1, 0, 0]
    with pytest.raises(UserError, match="share"):
        suggest(shares, 1.5)


def test_presets():
    lyc = {k: v for k, v in PRESETS.items() if "LyC" in k}
    assert set(lyc) == {
        "SDXL-LyC-ALL",
        "SDXL-LyC-NONE",
        "SDXL-LyC-INALL",
        "SDXL-LyC-MIDALL",
        "SDXL-LyC-OUTALL",
    }
    assert all(len(parse_vector(k)) == 21 for k in lyc)
    assert all(len(parse_vector(k)) == 12 for k in PRESETS if k not in lyc)
    assert parse_vector("SDXL-LyC-INALL") == [1] + [1] * 8 + [0] * 12
    assert parse_vector("SDXL-LyC-MIDALL") == [1] + [0] * 8 + [1] * 3 + [0] * 9
    assert parse_vector("SDXL-LyC-OUTALL") == [1] + [0] * 11 + [1] * 9
    assert parse_vector("SDXL-MIDALL") == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert parse_vector("mine: 1, 0.5 ,-1") == [1, 0.5, -1]  # NAME:vector, spaces allowed


def test_tokens_draw_like_the_inspire_loader():
    """np.random.seed(seed); each block entry in order; entry 0 last; entries past the blocks never."""
    a, b = 2.5, 0.8
    got = parse_vector("R,U,A,a,B,b,R,1,U", n_blocks=7, seed=1234, a=a, b=b)
    np.random.seed(1234)
    u1 = round(np.random.uniform(-1.5, 1.5), 2)
    r6 = round(np.random.uniform(0, 3.0), 2)
    r0 = round(np.random.uniform(0, 3.0), 2)
    assert got[:8] == [r0, u1, a, a / 2, b, b / 2, r6, 1.0]
    assert parse_vector("R,U,R", n_blocks=2, seed=5) == parse_vector("R,U,R", n_blocks=2, seed=5)
    assert parse_vector("R,U,R", n_blocks=2, seed=5) != parse_vector("R,U,R", n_blocks=2, seed=6)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("1,,0", "Entry 1 .*empty"),
        ("1,z,0", "Entry 1 .*'z'"),
        ("1,0 1", "sub-vectors"),
        ("NOPE", "neither a block vector nor a preset"),
        ("1,nan", "Entry 1"),
    ],
)
def test_malformed_vectors_name_the_problem(text, says):
    with pytest.raises(UserError, match=says):
        parse_vector(text)


def test_the_pure_parts_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from loradrop.engine.lora.blocks import layout, parse_vector, PRESETS, suggest\n"
        "lay = layout(['lora_unet_input_blocks_4_1_proj_in.alpha', 'lora_te1_x.alpha'])\n"
        "assert lay.vector_string == '1,INP04' and parse_vector('SDXL-LyC-ALL') == [1.0] * 21\n"
        "assert suggest([0.2, 0.8], 0.5) == [1, 0, 1]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
