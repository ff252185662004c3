"""One job, start to finish: scan → cache latents → train → samples → resize → analyse → chop.

This is the engine's face to the daemon. The daemon's worker process (spawned, the only process
that imports torch) holds one `Session`, which keeps base models loaded between jobs, and calls
`Session.run(spec, emit, control)` for each job. Everything the job does is reported through
`emit(kind, payload)`; the worker forwards those events to the server, which numbers and stores them.

Event kinds and payloads (plain JSON-able dicts):
  "log"       {"level": "info"|"warning"|"error", "text": str}
  "stage"     {"stage": "scan"|"cache"|"train"|"resize"|"analyze"|"chop"|"done"}
  "progress"  {"stage": str, "done": int, "total": int, "loss": float|None, "avg_loss": float|None,
               "lr_unet": float|None, "lr_te": float|None, "rate": float|None (units/s),
               "eta_s": float|None}
  "sample"    {"path": str, "step": int, "prompt_index": int, "prompt": str}
  "artifact"  {"path": str, "kind": "step"|"final"|"resized"|"chopped"|"recipe"|"log",
               "bytes": int, "step": int|None}

`control` lets the daemon steer a running job. The training loop calls `control.poll()` between
optimizer steps; it returns the set of requests that arrived ("save", "sample") and raises
`Cancelled` once the job has been cancelled. `poll` is also where the worker may service other
work that needs the loaded model (previews), so it should stay cheap when nothing is pending.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

Emit = Callable[[str, dict[str, Any]], None]


class Cancelled(Exception):
    """Raised by `Control.poll` when the job was cancelled; the job stops at a step boundary."""


class Control(Protocol):
    def poll(self) -> set[str]: ...


class NoControl:
    """For offline runs (the `train` command): nothing ever asks anything."""

    def poll(self) -> set[str]:
        return set()


@dataclass
class JobSpec:
    job_id: str
    name: str  # the LoRA's output name (file stem)
    dataset: Path
    out_dir: Path  # <home>/outputs/<job-id>/: everything the job writes goes here
    recipe: dict[str, Any]  # the frozen, resolved Recipe as a dict
    model: str | None = None  # base checkpoint; None = the tiny twin
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
