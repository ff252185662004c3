"""What a job tells whoever runs it, as small typed records, and the two calls that steer it.

The engine reports everything through `emit(event)`; the daemon's worker sends the records to the
server, which numbers and stores them and converts each to protobuf by its type; the offline
`train` command draws them as progress bars. Stored, an event is its `kind` and its fields as
JSON (`encode`); `decode` rebuilds the record, and a field it does not know is an error, not a
silent default. Imports nothing else of the project (and no torch): the daemon's server process and
every client read these types.

`Control` lets the daemon steer a running job. The training loop calls `control.poll()` between
optimizer steps: it returns the requests that arrived (SAVE, SAMPLE), raises `Cancelled` once the
job is cancelled or the worker is stopping, and is where the loop lends the job's network to the
worker, which may set it aside to render a preview on the loaded model for a bounded slice of time. `control.check()` only raises `Cancelled`: sampling calls it
between denoising steps, so a cancel never waits for a whole picture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Union

SAVE, SAMPLE = "save", "sample"  # what `Control.poll` may return


@dataclass(frozen=True)
class Log:
    text: str
    level: str = "info"  # "info" | "warning" | "error"
    KIND: ClassVar[str] = "log"


@dataclass(frozen=True)
class Stage:
    stage: str  # "caption" | "scan" | "cache" | "train" | "resize" | "analyze" | "chop" | "done"
    KIND: ClassVar[str] = "stage"


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int
    loss: float | None = None  # this step's loss
    avg_loss: float | None = None  # the running average over the last epoch's steps
    lr_unet: float | None = None
    lr_te: float | None = None
    rate: float | None = None  # units per second
    eta_s: float | None = None
    KIND: ClassVar[str] = "progress"


@dataclass(frozen=True)
class Sample:
    path: str
    step: int
    prompt_index: int
    prompt: str
    KIND: ClassVar[str] = "sample"


@dataclass(frozen=True)
class Artifact:
    path: str
    kind: str  # "step" | "final" | "resized" | "chopped" | "recipe" | "analysis" | "preview" | ...
    bytes: int
    step: int | None = None
    KIND: ClassVar[str] = "artifact"

    @classmethod
    def of(cls, path: Path, kind: str, step: int | None = None) -> "Artifact":
        """The record of a file just written (its size read now)."""
        return cls(str(path), kind, path.stat().st_size, step)


@dataclass(frozen=True)
class StateChange:
    """Made by the daemon's job store, never by the engine: a job entered `state`."""

    state: str
    error: str = ""
    KIND: ClassVar[str] = "state"


@dataclass(frozen=True)
class PreviewProgress:
    """A preview's rendering, one denoising step of one of its images at a time."""

    image: int
    images: int
    step: int
    steps: int
    request_id: str = ""
    KIND: ClassVar[str] = "preview"


Event = Union[Log, Stage, Progress, Sample, Artifact, StateChange, PreviewProgress]
Emit = Callable[[Event], None]
TYPES: dict[str, type] = {
    t.KIND: t for t in (Log, Stage, Progress, Sample, Artifact, StateChange, PreviewProgress)
}


def encode(event: Event) -> tuple[str, dict[str, Any]]:
    """(kind, fields) as stored and sent: plain JSON values."""
    return event.KIND, dataclasses.asdict(event)


def decode(kind: str, fields: dict[str, Any]) -> Event:
    """The record of a stored event; a kind or a field it does not know raises ValueError."""
    cls = TYPES.get(kind)
    if cls is None:
        raise ValueError(f"no event kind {kind!r}")
    try:
        return cls(**fields)
    except TypeError as e:
        raise ValueError(f"a {kind} event with fields {sorted(fields)}: {e}") from None


class Cancelled(Exception):
    """Raised by `Control.poll`/`check` once the job was cancelled or its worker is stopping."""


class Lendable(Protocol):
    """The running job's adapters, which a preview sets aside (`restore`) and puts back (`apply_to`)."""

    def restore(self) -> None: ...

    def apply_to(self) -> None: ...


class Control(Protocol):
    def poll(self, lend: Lendable | None = None) -> set[str]: ...

    def check(self) -> None: ...


class NoControl:
    """For offline runs (the `train` command): nothing ever asks anything."""

    def poll(self, lend: Lendable | None = None) -> set[str]:
        return set()

    def check(self) -> None:
        pass
