"""`loradrop resize`, `chop` and `blocks` as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from loradrop.cli import main
from loradrop.engine import tensorfile

# input_blocks.4 and output_blocks.1, and a text encoder module that passes through
MODULES = {
    "lora_unet_input_blocks_4_1_proj_in": (32, 32),
    "lora_unet_input_blocks_4_0_in_layers_2": (32, 16, 3, 3),
    "lora_unet_output_blocks_1_1_proj_out": (64, 64),
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": (64, 32),
}


@pytest.fixture
def lora(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in MODULES.items():
        tensors[name + ".lora_down.weight"] = torch.randn(4, *shape[1:], generator=g).half()
        tensors[name + ".lora_up.weight"] = (
            torch.randn(shape[0], 4, *([1] * (len(shape) - 2)), generator=g) * 0.05
        ).half()
        tensors[name + ".alpha"] = torch.tensor(2.0).half()
    path = tmp_path / "mine.safetensors"
    save_file(tensors, str(path), metadata={"ss_output_name": "mine"})
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_blocks_prints_the_layout_and_energy(capsys, lora, tiny_path):
    code, out, _ = run(capsys, "blocks", lora)
    assert code == 0
    lines = out.splitlines()
    assert (
        lines[0] == "Blocks layout:"
        and lines[1].startswith("  [ 0]  input_blocks.4 layers=6")
        and lines[2].startswith("  [ 1] output_blocks.1 layers=3")
    )
    assert (
        'Vector string : "1,INP04,OUT01"' in out and "Pass through layers: 3" in out and "relative" not in out
    )

    code, out, _ = run(capsys, "blocks", lora, "--model", tiny_path, "--suggest", "60%")
    assert code == 0 and "relative=" in out
    vector = next(line for line in out.splitlines() if line.startswith("Suggested vector")).rsplit(": ", 1)[1]
    assert vector.split(",")[0] == "1" and len(vector.split(",")) == 3
    assert "BASE" in out  # says what entry 0 means in the loader


def test_chop_writes_beside_the_input_and_says_what_it_kept(capsys, lora):
    code, out, _ = run(capsys, "chop", lora, "1,0,1")
    assert code == 0
    chopped = lora.with_name("mine-chop.safetensors")
    assert (
        f"wrote {chopped}" in out and "[ 0]  input_blocks.4 layers=6   (removed)" in out and "weight=1" in out
    )
    assert {k.split(".")[0] for k in load_file(str(chopped))} == {
        "lora_unet_output_blocks_1_1_proj_out",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    }
    assert tensorfile.read_metadata(chopped)["ss_output_name"] == "mine-chop"  # its own name in A1111's list


def test_chop_entry_zero_is_explained_when_it_is_not_one(capsys, lora, tmp_path):
    code, out, _ = run(capsys, "chop", lora, "0.5,1,1", "-o", tmp_path / "half.safetensors")
    assert code == 0 and (tmp_path / "half.safetensors").exists()
    assert "global factor" in out and "BASE" in out


def test_chop_with_a_wrong_length_prints_the_layout_and_fails(capsys, lora):
    code, _, err = run(capsys, "chop", lora, "1,1")
    assert code == 2
    assert "Blocks layout:" in err and "input_blocks.4 layers=6" in err
    assert "needs 3 entries" in err and "Traceback" not in err
    assert not lora.with_name("mine-chop.safetensors").exists()


def test_resize_writes_the_file_and_shows_progress(capsys, lora, tiny_path, tmp_path):
    code, out, err = run(
        capsys,
        "resize",
        tiny_path,
        lora,
        "-r",
        "fro_ckpt=1,thr=-3",
        "-o",
        tmp_path / "out",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    )
    assert code == 0
    result = tmp_path / "out" / "mine_frockpt1_th-3.safetensors"
    assert f"wrote {result}" in out and "threshold -3" in out
    assert "resize [" in err and "4/4 modules" in err
    assert all(t.dtype == torch.float32 for t in load_file(str(result)).values())
    assert tensorfile.read_metadata(result)["ss_output_name"] == "mine_frockpt1_th-3"


def test_train_names_the_run_after_its_folder_unless_told(capsys, tmp_path, tiny_path):
    from loradrop.testing import make_dataset

    data = make_dataset(tmp_path / "mychar", images=1)
    common = [
        "train",
        data,
        "--model",
        tiny_path,
        "--recipe",
        data / "loradrop.toml",
        "--set",
        "max_train_steps=1",
        "--cache-dir",
        tmp_path / "cache",
    ]
    assert run(capsys, *common, "-o", tmp_path / "a")[0] == 0
    assert tensorfile.read_metadata(tmp_path / "a" / "mychar.safetensors")["ss_output_name"] == "mychar"
    code, out, _ = run(capsys, *common, "-o", tmp_path / "b", "--set", "output_name=other")
    assert code == 0 and out.strip().endswith("other.safetensors")
    assert tensorfile.read_metadata(tmp_path / "b" / "other.safetensors")["ss_output_name"] == "other"


def test_train_reports_a_kohya_folder_per_subfolder(capsys, tmp_path, tiny_path):
    from loradrop.testing import make_dataset

    data = tmp_path / "img"
    make_dataset(data / "4_zkw", images=2)
    make_dataset(data / "notes", images=1)  # not N_name: kohya ignores it, and so does loradrop, saying so
    (data / "4_zkw" / "bad.png").write_bytes(b"")
    code, out, err = run(
        capsys,
        "train",
        data,
        "--model",
        tiny_path,
        "--recipe",
        data / "4_zkw" / "loradrop.toml",
        "--set",
        "max_train_steps=1",
        "--cache-dir",
        tmp_path / "cache",
        "-o",
        tmp_path / "out",
    )
    said = out + err
    assert code == 0
    assert f"{data}: 2 images, 8 per epoch, from 1 folder (kohya's N_name layout)" in said
    assert "4_zkw/: 2 images x 4 repeats = 8 per epoch, 1 skipped" in said
    assert (
        "has images in subfolders (notes/); they are not used" in said and "4_zkw/bad.png: empty file" in said
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [(["-r", "fro_ckpt=1,thr=-3,speed=9"], "Unknown key 'speed'"), (["-r", "thr=-3"], "No score weight")],
)
def test_resize_with_a_bad_recipe_says_why(capsys, lora, tiny_path, argv, says):
    code, _, err = run(capsys, "resize", tiny_path, lora, *argv)
    assert code == 2 and says in err and "Traceback" not in err


def test_other_adapters_are_refused_in_one_sentence(capsys, tmp_path, tiny_path):
    loha = tmp_path / "loha.safetensors"
    save_file(
        {"lora_unet_x.hada_w1_a": torch.ones(2, 2), "lora_unet_x.hada_w1_b": torch.ones(2, 2)}, str(loha)
    )
    for argv in (["blocks", loha], ["chop", loha, "1"], ["resize", tiny_path, loha]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "is a LoHa" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("chop", ["global factor", "BASE", "linear"]),
        ("blocks", ["BASE", "relative"]),
        ("resize", ["fro_ckpt", "spn_ckpt", "subspace", "size=", "rescale="]),
    ],
)
def test_help_explains_and_needs_no_torch(command, says):
    code = f"import sys; sys.modules['torch'] = None\nfrom loradrop.cli import main\nmain(['{command}', '--help'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert all(s in text for s in says)
