"""pyproject lists packages by hand (the rooms map under one prefix): none may be forgotten."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOMS = {
    "loradrop": "loradrop",
    "engine": "loradrop.engine",
    "daemon": "loradrop.daemon",
    "tui": "loradrop.tui",
    "proto": "loradrop.proto",
}


def test_every_package_folder_is_listed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, prefix in ROOMS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([prefix, *rel.parts]))
    data = {p for p in listed if ".data." in p}
    assert found - listed == set(), f"add to pyproject's packages: {sorted(found - listed)}"
    assert listed - found - data == set(), f"listed but missing: {sorted(listed - found - data)}"
