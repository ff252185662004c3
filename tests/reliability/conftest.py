"""Fixtures for the reliability tests: short temporary homes, daemons that never outlive a test,
and the repository root on the import path (bench/chaos.py holds the chaos run the suite shortens)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from support import Daemon

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture
def home():
    # Short paths: a unix socket path must stay under ~100 characters.
    root = Path(tempfile.mkdtemp(prefix="ldr-", dir="/tmp"))
    yield root / "home"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemons():
    """Start daemons with `daemons(home, *args)`; every one is killed at the end if still running."""
    started: list[Daemon] = []

    def start(home: Path, *args: str, wait: bool = True, **kwargs) -> Daemon:
        d = Daemon(home, *args, **kwargs)
        started.append(d)
        return d.start(wait)

    yield start
    for d in started:
        if d.process and d.process.poll() is None:
            d.kill()
