"""LoRA file operations the daemon offers, run inside a worker process (they need torch).

Each takes and returns plain values (they cross the worker's pipe); paths were checked by the
server before the call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def blocks(path: str) -> dict[str, Any]:
    from loradrop.engine.lora.blocks import PRESETS, energy

    report = energy(Path(path))
    return {
        "path": path,
        "blocks": [
            {"name": b.name, "label": b.short, "tensors": b.tensors, "energy": b.energy, "share": b.share}
            for b in report.blocks
        ],
        "pass_through": report.passthrough.tensors,
        "vector": report.layout.vector_string,
        "presets": dict(PRESETS),
    }


def chop(path: str, vector: str) -> str:
    from loradrop.engine.lora.chop import chop as chop_file
    from loradrop.engine.lora.finite import finite_output
    from loradrop.engine.outputs import chopped_name

    source = Path(path)
    return str(
        finite_output(
            lambda staging: chop_file(source, vector, staging / chopped_name(source)).path, source.parent
        )
    )


def resize(path: str, recipe: str, model: str | None) -> str:
    from loradrop.engine.lora.finite import finite_output
    from loradrop.engine.lora.resize import resize as resize_file

    source = Path(path)
    return str(
        finite_output(
            lambda staging: resize_file(_base_model(model), source, recipe, out_dir=staging).path,
            source.parent,
        )
    )


def start_preview(
    session,
    *,
    lora: str,
    vector: str | None,
    prompts: list[str] | None,
    seed: int,
    model: str | None,
    out_dir: str,
    steps: int,
    progress,
):
    """A preview begun on the worker's session; the worker renders it in slices (PreviewRender.advance)."""
    return session.start_preview(
        Path(lora), vector, prompts, seed, model, Path(out_dir), steps=steps or None, progress=progress
    )


def _base_model(model: str | None) -> Path:
    if model:
        return Path(model)
    from loradrop.engine.models.tiny import default_model_path

    return default_model_path()
