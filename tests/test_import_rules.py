"""The walls between the rooms (DESIGN.md), each checked here and each shown to fail when crossed.

- engine imports no grpc, Textual or daemon code; tui and proto import no torch, no engine and
  no daemon code (the client installs without torch and talks to the daemon only over the API);
- the contracts between rooms (the engine's events and job spec, the daemon's records and pipe
  messages) import nothing of the project but each other;
- the torch-free layer (the contracts, the recipe and its kohya import, the block layout, the
  prompt and caption syntax, the output names) and the daemon's server process load no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "diffusers", "transformers", "lycoris", "safetensors"}
FORBIDDEN = {
    "engine": {"grpc", "textual", "textual_image", "loradrop.daemon", "loradrop.tui", "loradrop.proto"},
    "tui": HEAVY | {"loradrop.engine", "loradrop.daemon"},
    "proto": HEAVY | {"loradrop.engine", "loradrop.daemon", "textual"},
}
# Each contract module and the project modules it may import.
CONTRACTS = {
    "engine/events.py": set(),
    "engine/jobspec.py": set(),
    "daemon/records.py": {"loradrop.engine.events"},
    "daemon/pipe.py": {"loradrop.engine.events", "loradrop.engine.jobspec", "loradrop.daemon.records"},
}
TORCH_FREE = [
    "engine.events",
    "engine.jobspec",
    "engine.outputs",
    "engine.recipe",
    "engine.kohya_args",
    "engine.lora.blocks",
    "engine.data.prompts",
    "engine.data.captions",
    "daemon.records",
    "daemon.pipe",
    "daemon.server",
]


def imports(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved to their absolute names."""
    package = ["loradrop", *path.relative_to(REPO).with_suffix("").parts[:-1]]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
                if not node.module:  # `from . import x`: the modules themselves
                    names.update(f"{base}.{a.name}" for a in node.names)
                    continue
            names.add(base)
    return names


def crossings(paths: list[Path], forbidden: set[str]) -> list[str]:
    return [
        f"{p.relative_to(REPO)} imports {name}"
        for p in paths
        for name in sorted(imports(p))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_imports_nothing_forbidden(room):
    bad = crossings(sorted((REPO / room).rglob("*.py")), FORBIDDEN[room])
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_contracts_import_only_contracts(contract):
    project = {n for n in imports(REPO / contract) if n.startswith("loradrop.") and n != "loradrop.errors"}
    assert project <= CONTRACTS[contract], f"{contract} imports {sorted(project - CONTRACTS[contract])}"


def test_a_crossed_wall_is_seen(tmp_path, monkeypatch):
    """The checker itself: a tui module that reaches into the daemon, relatively or not, is caught."""
    room = tmp_path / "tui" / "screens"
    room.mkdir(parents=True)
    (room / "bad.py").write_text(
        "from ...daemon.home import Home\nimport loradrop.engine.recipe\nfrom .. import app\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    bad = crossings([room / "bad.py"], FORBIDDEN["tui"])
    assert bad == [
        "tui/screens/bad.py imports loradrop.daemon.home",
        "tui/screens/bad.py imports loradrop.engine.recipe",
    ]


def test_torch_free_layer_loads_no_torch():
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module('loradrop.' + name)\n"
        f"heavy = sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_help_loads_no_torch():
    code = (
        "import sys, loradrop.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'grpc') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
