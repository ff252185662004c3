"""A job as the daemon hands it to the engine, and what the engine hands back (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class JobSpec:
    job_id: str
    name: str  # the LoRA's output name (file stem)
    dataset: Path
    out_dir: Path  # <home>/outputs/<job-id>/: everything the job writes goes here (engine/outputs.py)
    recipe: dict[str, Any]  # the frozen, resolved Recipe as a dict (Recipe.to_dict)
    model: str | None = None  # base checkpoint; None = the default twin
    block_vector: str | None = None  # chop vector; None = no chop stage
    cache_dir: Path | None = None  # latent cache root (outside the dataset)
    resume: bool = True  # continue from the last full checkpoint in out_dir when there is one


@dataclass
class JobResult:
    final: Path | None = None
    resized: Path | None = None
    chopped: Path | None = None
    samples: list[Path] = field(default_factory=list)
    steps_done: int = 0
