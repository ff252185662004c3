"""The learned twin's script trains (its loss falls) and describes what it wrote in a manifest
naming the script's hash and the file's own."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from loradrop.engine.models.tiny import LEARNED_TWIN
from loradrop.engine.twin import build


@pytest.mark.timeout(300)
def test_the_script_trains_and_describes_what_it_wrote(tmp_path):
    work = tmp_path / "work"
    args = [sys.executable, "-m", "loradrop.engine.twin.build", "--work", str(work), "--scale", "0.01"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    log = torch.load(work / "state.pt", weights_only=False)["log"]
    unet = [loss for phase, _, loss in log if phase == "unet"]
    assert unet[-1] < 0.75 * unet[0], unet
    manifest = json.loads((work / "learned-twin.json").read_text())
    assert manifest["script_tree_sha256"] == build.script_hash()
    assert (
        manifest["file_sha256"]
        == hashlib.sha256((work / "learned-twin.safetensors").read_bytes()).hexdigest()
    )


def test_the_committed_twin_is_what_the_committed_script_makes():
    manifest = json.loads(LEARNED_TWIN.with_suffix(".json").read_text())
    assert manifest["script_tree_sha256"] == build.script_hash(), (
        "build.py or world.py changed: retrain the twin (make twin)"
    )
    assert manifest["file_sha256"] == hashlib.sha256(LEARNED_TWIN.read_bytes()).hexdigest()
    assert manifest["settings"] == json.loads(json.dumps(build.dataclasses.asdict(build.Settings())))
    assert LEARNED_TWIN.stat().st_size <= 26_000_000
    assert manifest["figures"]["vae_round_trip"]["all"] >= 0.95
