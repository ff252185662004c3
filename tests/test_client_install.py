"""The base install is the client: `pip install .` without the train extra gives a working CLI and
TUI entry point, with no torch anywhere in the environment."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.slow
def test_pip_install_without_train_extra_has_no_torch(tmp_path):
    env_dir = tmp_path / "client-venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", str(REPO)], check=True, capture_output=True, timeout=900)

    assert subprocess.run([py, "-c", "import torch"], capture_output=True).returncode != 0
    loradrop = env_dir / "bin" / "loradrop"
    help_text = subprocess.run([loradrop, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("daemon", "submit", "jobs", "logs", "tui", "train", "resize", "chop", "blocks"):
        assert command in help_text
    subprocess.run([loradrop, "tui", "--help"], check=True, capture_output=True)
    subprocess.run([py, "-c", "import loradrop.tui.app, loradrop.proto.client"], check=True, capture_output=True)

    # a command that needs the engine says what to install, in one line
    r = subprocess.run([loradrop, "make-tiny", str(tmp_path / "t.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and "pip install 'loradrop[train]'" in r.stderr and "Traceback" not in r.stderr
