"""The metadata a LoRA browser reads, checked against what each kind of file really is.

A1111, Civitai and ComfyUI's browsers show a LoRA by ss_output_name and modelspec.title, class it
by ss_base_model_version and modelspec.architecture, describe its network with ss_network_*,
and find it by sshs_model_hash. Each kind of file loradrop writes (trained by `loradrop train`,
resized, chopped, and the benches' built LoCon) is read back and every field checked against
its meaning: the network args rebuild the file's module set with LyCORIS, the ranks and alphas
are the file's, the hashes are those of its bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from loradrop.cli import main
from loradrop.engine import tensorfile
from loradrop.engine.lora.chop import chop
from loradrop.engine.lora.resize import resize
from loradrop.engine.recipe import Recipe
from loradrop.engine.train.network import Preset
from loradrop.testing import make_dataset

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the benches' LoCon builder, bench/resize_bench.py
    sys.path.insert(0, str(REPO))

from bench.resize_bench import build_lora, seed_modules  # noqa: E402

EVERY_OTHER = "1," + ",".join("1" if i % 2 else "0" for i in range(20))


@pytest.fixture(scope="module")
def files(tiny_path, tmp_path_factory):
    """kind → (file, the ss_output_name it must carry)."""
    tmp = tmp_path_factory.mktemp("meta")
    data = make_dataset(tmp / "zkw thing", images=2)  # the dataset folder names the run
    out = tmp / "out"
    code = main(
        [
            "train",
            str(data),
            "-o",
            str(out),
            "--model",
            str(tiny_path),
            "--recipe",
            str(data / "loradrop.toml"),
            "--set",
            "max_train_steps=1",
            "--set",
            "conv_dim=256",
            "--cache-dir",
            str(tmp / "cache"),
        ]
    )
    assert code == 0
    trained = out / "zkw thing.safetensors"
    size = 0.9 * trained.stat().st_size / 2**20
    resized = resize(tiny_path, trained, f"fro_ckpt=1,size={size:.3f}", tmp / "resized").path
    chopped = chop(resized, EVERY_OTHER).path
    bench = tmp / "bench-locon.safetensors"
    build_lora(bench, True, tiny_path)
    return {
        "trained": (trained, "zkw thing"),
        "resized": (resized, resized.stem),
        "chopped": (chopped, resized.stem + "-chop"),
        "bench": (bench, "bench-locon"),
    }


def read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with tensorfile.TensorFile(path) as tf:
        return dict(tf.metadata), tf.read_all()


def modules(tensors) -> dict[str, tuple[int, float, bool]]:
    """module → (rank, alpha, is a 3x3 conv)."""
    return {
        k[: -len(".lora_down.weight")]: (
            t.shape[0],
            float(tensors[k.replace("lora_down.weight", "alpha")]),
            t.dim() == 4 and t.shape[-1] == 3,
        )
        for k, t in tensors.items()
        if k.endswith(".lora_down.weight")
    }


@pytest.mark.parametrize("kind", ["trained", "resized", "chopped", "bench"])
def test_fields_a_lora_browser_reads_say_what_the_file_is(kind, files, tiny_path):
    path, name = files[kind]
    meta, tensors = read(path)
    mods = modules(tensors)

    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"  # A1111 classes it as SDXL by the "sdxl_" prefix
    assert meta["ss_output_name"] == meta["modelspec.title"] == name
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    made = datetime.datetime.fromisoformat(meta["modelspec.date"])
    assert abs((datetime.datetime.now() - made).total_seconds()) < 3600

    # The network: LyCORIS' kohya module, LoCon tensors only, its preset rebuilding the module set.
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya" and args["algo"] == "locon"
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    preset = Preset(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in tomllib.loads(args["preset"]).items()}
    )
    rebuilt = seed_modules(
        True, preset, Recipe(conv_dim=int(args["conv_dim"]))
    )  # module → (down shape, up shape, alpha)
    if kind in ("trained", "bench"):
        assert set(mods) == set(rebuilt)
        for module, (rank, alpha, conv) in mods.items():
            down = rebuilt[module][0]
            cap = min(
                rebuilt[module][1][0], int(torch.Size(down[1:]).numel())
            )  # a layer's rank is capped at what it allows
            assert rank == (min(int(args["conv_dim"]), cap) if conv else int(meta["ss_network_dim"])), module
            assert alpha == float(args["conv_alpha"] if conv else meta["ss_network_alpha"]), module
    else:
        assert set(mods) < set(rebuilt)
        ranks = {r for r, _, _ in mods.values()}
        assert meta["ss_network_dim"] == ("Dynamic" if len(ranks) > 1 else str(ranks.pop()))
        assert {a for _, a, _ in mods.values()} == {float(meta["ss_network_alpha"])}  # one alpha, as it says

    # The hashes: kohya's sshs_* of the file, the base's ss_sd_model_* of the checkpoint.
    data = path.read_bytes()
    assert (
        meta["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()
    )
    as_kohya_saves = save(load_file(str(path)), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(as_kohya_saves[0x100000:0x110000]).hexdigest()[:8]
    base = tiny_path.read_bytes()
    assert meta["ss_sd_model_name"] == tiny_path.name
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(base).hexdigest()
    assert meta["ss_sd_model_hash"] == hashlib.sha256(base[0x100000:0x110000]).hexdigest()[:8]


def test_derived_files_keep_the_training_facts(files):
    trained, _ = read(files["trained"][0])
    for kind in ("resized", "chopped"):
        meta, _ = read(files[kind][0])
        for key in (
            "ss_session_id",
            "ss_steps",
            "ss_tag_frequency",
            "ss_dataset_dirs",
            "ss_network_args",
            "ss_learning_rate",
        ):
            assert meta[key] == trained[key], (kind, key)
    assert "resize_params" in read(files["chopped"][0])[0]  # a chop of a resized file says both
