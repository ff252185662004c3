"""The rooms' import rules (DESIGN.md): the client installs without torch, the engine without grpc."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "engine": {"grpc", "textual", "textual_image", "loradrop.daemon", "loradrop.tui", "loradrop.proto"},
    "tui": {"torch", "diffusers", "transformers", "lycoris", "safetensors", "loradrop.engine"},
    "proto": {"torch", "diffusers", "transformers", "lycoris", "safetensors", "loradrop.engine", "textual"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_imports_nothing_forbidden(room):
    bad = []
    for path in sorted((REPO / room).rglob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[room]):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


def test_cli_help_loads_no_torch():
    code = (
        "import sys, loradrop.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'grpc') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
