"""The messages between the daemon and a worker process, one small record each.

They cross a multiprocessing pipe as pickles, so both ends hold the same types: the server
process imports this module without torch (it imports only the engine's torch-free contracts and
the daemon's records). Strings in them are valid text (`printable`): file names that are not
UTF-8 are made printable by the worker before a message leaves it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Callable, TypeVar, Union

from loradrop.engine.events import Event, PreviewProgress
from loradrop.engine.jobspec import JobSpec

from .records import CaptionSettings, JobFiles

# ---------------------------------------------------------------- to the worker


@dataclass(frozen=True)
class Run:
    spec: JobSpec
    inbox: str  # the worker checks the folder's links again before reading it
    captions: CaptionSettings = field(
        default_factory=CaptionSettings
    )  # the caption stage, run before the engine's scan


@dataclass(frozen=True)
class Steer:
    """A request for the running job: "save", "sample" or "cancel"."""

    job_id: str
    request: str


@dataclass(frozen=True)
class Call:
    """A tool function of daemon/tools.py (or a preview, on a training worker)."""

    id: int
    name: str
    args: dict[str, Any]


@dataclass(frozen=True)
class CancelCall:
    id: int


@dataclass(frozen=True)
class Stop:
    """Stop at the next step (or denoising) boundary; the job goes back to the queue."""


ToWorker = Union[Run, Steer, Call, CancelCall, Stop]

# ---------------------------------------------------------------- from the worker


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Fatal:
    """The worker cannot start (its engine did not load)."""

    error: str


@dataclass(frozen=True)
class Beat:
    """Sent every HEARTBEAT seconds whatever the worker does: silence means frozen."""


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    body: Event
    time: float  # when the engine emitted it


DONE, FAILED, CANCELLED, STOPPED, REVIEW = "done", "failed", "cancelled", "stopped", "review"


@dataclass(frozen=True)
class Done:
    job_id: str
    outcome: str  # DONE | FAILED | CANCELLED | STOPPED (by the daemon: requeue) | REVIEW (captioned, held)
    error: str = ""
    result: JobFiles = field(default_factory=JobFiles)


@dataclass(frozen=True)
class CallProgress:
    id: int
    progress: PreviewProgress


@dataclass(frozen=True)
class Reply:
    id: int
    ok: bool
    value: Any = None
    error: str = ""
    user: bool = False  # the caller's mistake (a UserError): said as it is
    space: bool = False  # the disk was full


FromWorker = Union[Ready, Fatal, Beat, JobEvent, Done, CallProgress, Reply]

T = TypeVar("T")
_SURROGATES = re.compile("[\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` with U+FFFD for what UTF-8 cannot spell: a file name that is not UTF-8 reaches
    Python as lone surrogates, which neither sqlite nor protobuf accepts."""
    return _SURROGATES.sub("\ufffd", text)


def printable_record(record: T) -> T:
    """A record with every string in it printable (nested records, lists and dicts too)."""
    return map_strings(record, printable)


def map_strings(value: T, change: Callable[[str], str]) -> T:
    """`value` with `change` applied to every string in it, paths included (nested records,
    lists and dicts too)."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, PurePath):
        return type(value)(change(str(value)))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value,
            **{
                f.name: map_strings(getattr(value, f.name), change)
                for f in dataclasses.fields(value)
                if f.init
            },
        )
    if isinstance(value, (list, tuple)):
        return type(value)(map_strings(v, change) for v in value)
    if isinstance(value, dict):
        return {map_strings(k, change): map_strings(v, change) for k, v in value.items()}
    return value
