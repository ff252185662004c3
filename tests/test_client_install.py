"""The base install is the client: `pip install .` without the train extra gives a working CLI and
TUI entry point, with no torch anywhere in the environment."""

from __future__ import annotations

import functools
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_without_train_extra_has_no_torch(tmp_path):
    # Run from outside the checkout: its loradrop/ folder would shadow the installed package.
    run = functools.partial(subprocess.run, cwd=tmp_path, capture_output=True)
    env_dir = tmp_path / "client-venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    run([py, "-m", "pip", "install", "-q", str(REPO)], check=True, timeout=900)

    assert run([py, "-c", "import torch"]).returncode != 0
    loradrop = env_dir / "bin" / "loradrop"
    help_text = run([loradrop, "--help"], text=True, check=True).stdout
    for command in ("daemon", "submit", "jobs", "logs", "tui", "train", "resize", "chop", "blocks"):
        assert command in help_text
    run([loradrop, "tui", "--help"], check=True)
    run([py, "-c", "import loradrop.tui.app, loradrop.proto.client"], check=True)

    # a command that needs the engine says what to install, in one line
    r = run([loradrop, "make-tiny", str(tmp_path / "t.safetensors")], text=True)
    assert r.returncode == 2 and "pip install 'loradrop[train]'" in r.stderr and "Traceback" not in r.stderr
