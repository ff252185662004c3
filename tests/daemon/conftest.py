"""Fixtures for the daemon tests: temporary homes with short paths, and daemons stopped at the end."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from support import Daemon


@pytest.fixture
def home():
    # Short paths: a unix socket path must stay under ~100 characters.
    root = Path(tempfile.mkdtemp(prefix="ld-", dir="/tmp"))
    yield root / "home"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def daemons():
    """Start daemons with `daemons(home, *args)`; every one is stopped (or killed) at the end."""
    started: list[Daemon] = []

    def start(home: Path, *args: str, wait: bool = True, **kwargs) -> Daemon:
        d = Daemon(home, *args, **kwargs)
        started.append(d)
        return d.start(wait)

    yield start
    for d in started:
        if d.process and d.process.poll() is None:
            d.kill()
