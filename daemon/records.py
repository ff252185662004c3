"""The daemon's records of jobs and events, as the job store keeps them (sqlite rows made typed).

Imports nothing of the daemon: the store, the API's conversions, the supervisor and the hooks
all read these.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from loradrop.engine.events import Event as Body
from loradrop.engine.events import Progress, decode

QUEUED, RUNNING, DONE, FAILED, CANCELLED, REVIEW = (
    "queued",
    "running",
    "done",
    "failed",
    "cancelled",
    "review",
)
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED, REVIEW)
WAITING = (QUEUED, REVIEW)  # not ended, not running: a cancel ends them at once
TERMINAL = frozenset({DONE, FAILED, CANCELLED})


@dataclass(frozen=True)
class CaptionSettings:
    """The caption stage's settings, frozen with the job (daemon/captions.py resolves them)."""

    model: str | None = None  # the captioner; None: the job's images must all be captioned already
    kind: str = ""  # "tagger" | "vlm" | "" (told apart by the files)
    trigger: str = ""
    review: bool = False  # hold the job in review after captioning
    accepted: bool = False  # a person accepted the captions: the stage does not run again


@dataclass(frozen=True)
class JobFiles:
    """What a finished job made (paths as text; "" where a stage did not run)."""

    final: str = ""
    resized: str = ""
    chopped: str = ""
    steps_done: int = 0


@dataclass(frozen=True)
class Job:
    number: int
    id: str
    name: str
    state: str
    source: str  # "inbox", "submit", "upload"
    dataset: str
    inbox_key: str | None
    model: str | None
    block_vector: str | None
    recipe: (
        dict[str, Any] | None
    )  # the frozen Recipe as a dict; None: refused before a recipe could be resolved
    created: float
    started: float | None
    ended: float | None
    error: str
    attempts: int
    progress: Progress | None
    result: JobFiles = field(default_factory=JobFiles)
    last_seq: int = 0
    captions: CaptionSettings | None = (
        None  # None for a job refused at intake (or from before the caption stage)
    )
    pin: str = ""  # a Ray resource the node running it must offer (loradrop.toml's `pin`); "": any node


@dataclass(frozen=True)
class ClusterNode:
    """One machine of the Ray cluster the daemon's workers run on."""

    id: str  # the first 8 hex digits of Ray's node id (as the workers' `node` names it)
    address: str  # its IP address
    alive: bool
    gpus: float  # the GPU resource it offers (the daemon's --ray-resource, "GPU" by default)
    gpus_free: float  # of those, not running one of the daemon's jobs
    labels: tuple[str, ...] = ()  # its other custom resources (the names a job may pin), sorted


@dataclass(frozen=True)
class ClusterView:
    address: str = ""  # the Ray cluster's address; "" when the daemon runs its workers locally
    resource: str = ""  # the resource that stands for a GPU
    nodes: tuple[ClusterNode, ...] = ()


@dataclass(frozen=True)
class Event:
    gseq: int
    job_id: str  # "" for the daemon's own events
    seq: int  # per job; for daemon events the same as gseq
    time: float
    body: Body

    @property
    def kind(self) -> str:
        return self.body.KIND


def job_from_row(row: sqlite3.Row) -> Job:
    return Job(
        number=row["number"],
        id=row["id"],
        name=row["name"],
        state=row["state"],
        source=row["source"],
        dataset=row["dataset"],
        inbox_key=row["inbox_key"],
        model=row["model"],
        block_vector=row["block_vector"],
        recipe=None if row["recipe"] is None else json.loads(row["recipe"]),
        created=row["created"],
        started=row["started"],
        ended=row["ended"],
        error=row["error"],
        attempts=row["attempts"],
        progress=None if row["progress"] is None else decode("progress", json.loads(row["progress"])),
        result=_files(json.loads(row["result"])),
        last_seq=row["last_seq"],
        captions=None if row["captions"] is None else CaptionSettings(**json.loads(row["captions"])),
        pin=row["pin"],
    )


def event_from_row(row: sqlite3.Row) -> Event:
    return Event(
        row["gseq"], row["job_id"], row["seq"], row["time"], decode(row["kind"], json.loads(row["payload"]))
    )


def _files(stored: dict[str, Any]) -> JobFiles:
    # Older rows hold the engine's whole result (its samples too); the record keeps what it names.
    return JobFiles(
        **{f.name: stored[f.name] or f.default for f in dataclasses.fields(JobFiles) if f.name in stored}
    )
