"""The reliability tests import the chaos run from bench/chaos.py: the repository root goes on
the import path (the `home` and `daemons` fixtures come from tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
