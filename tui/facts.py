"""What the screens say about a job: from its `pb.Job` and what its events told the app since (`Seen`).

A job's `progress` is only its latest progress event, which is not always what the job is doing:
a stage begins before its first progress event (the header said "cache 8/8" for the first half
minute of training), and a done job's last event is the resize's, with no loss. `Seen` keeps the
stage the job is in, its last training progress, and when the progress arrived, so the ETA counts
down between steps. Pure: no Textual here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rich.markup import escape

from loradrop.progress import format_duration
from loradrop.proto.client import state_name
from loradrop.proto.v1 import loradrop_pb2 as pb

from .formatting import ERROR

STEP_WIDTH = 11  # the queue's step column


@dataclass
class Seen:
    stage: str = ""  # the stage it is in ("" until a stage event is seen)
    train: pb.Progress | None = None  # its last training progress: a done job's steps and final loss
    progress_at: float | None = None  # time.monotonic() when the job's progress arrived

    def learn(self, event: pb.Event, now: float, wall: float) -> None:
        """Take what a "stage" or "progress" event says (other events say nothing here); `now` is
        time.monotonic() and `wall` time.time() as it arrives (an event replayed from the
        daemon's store is as old as its time says)."""
        if event.HasField("stage"):
            self.stage = event.stage.stage
        elif event.HasField("progress"):
            self.progress_at = now - min(max(wall - event.time, 0.0), 3600.0)
            self.stage = event.progress.stage
            if event.progress.stage == "train":
                self.train = event.progress


def _stage(job: pb.Job, seen: Seen) -> str:
    return seen.stage or job.progress.stage


def _current(job: pb.Job, seen: Seen) -> pb.Progress | None:
    """The job's progress, when it is of the stage the job is in (not the stage before)."""
    if not job.HasField("progress") or not job.progress.total or job.progress.stage != _stage(job, seen):
        return None
    return job.progress


def steps_text(job: pb.Job, seen: Seen, width: int = STEP_WIDTH) -> str:
    """`12/80` while training; another stage by name (its count when that fits `width`, else a
    percentage); `… ` while a stage waits for its first step; a done job's training steps."""
    if job.state == pb.DONE:
        return f"{seen.train.done}/{seen.train.total}" if seen.train else ""
    p = _current(job, seen)
    if p is None:
        stage = _stage(job, seen) if job.state == pb.RUNNING else ""
        return f"{stage} …" if stage and stage != "done" else ""
    if p.stage == "train":
        return f"{p.done}/{p.total}"
    text = f"{p.stage} {p.done}/{p.total}"
    return text if len(text) <= width else f"{p.stage} {100 * p.done // p.total}%"


def avg_loss(job: pb.Job, seen: Seen) -> float | None:
    """The running average of the training loss (over the last epoch's steps): the one loss the
    queue, the header and `loradrop jobs` show; a done job's is its last step's."""
    if job.HasField("progress") and job.progress.HasField("avg_loss"):
        return job.progress.avg_loss
    if seen.train is not None and seen.train.HasField("avg_loss"):
        return seen.train.avg_loss
    return None


def eta_seconds(job: pb.Job, seen: Seen, now: float) -> float | None:
    """Seconds left, counted down from when the job's progress arrived."""
    p = _current(job, seen)
    if job.state != pb.RUNNING or p is None or not p.HasField("eta_s"):
        return None
    waited = now - seen.progress_at if seen.progress_at is not None else 0.0
    return max(p.eta_s - waited, 0.0)


def eta_text(job: pb.Job, seen: Seen, now: float) -> str:
    eta = eta_seconds(job, seen, now)
    return "" if eta is None else format_duration(eta)


def outputs(job: pb.Job) -> list[tuple[str, str]]:
    """A job's LoRA files, the one to use first: (kind, path)."""
    return [
        (kind, path)
        for kind, path in (("chopped", job.chopped), ("resized", job.resized), ("final", job.final))
        if path
    ]


def title_parts(job: pb.Job, seen: Seen, now: float) -> list[str]:
    """The job screen's title line, as parts (joined with " · "); rich markup."""
    parts = [f"[b]{escape(job.id)}[/]", state_name(job.state)]
    loss = avg_loss(job, seen)
    if job.state == pb.DONE:
        if seen.train is not None:
            parts.append(f"{seen.train.done} steps")
        if loss is not None:
            parts.append(f"avg loss {loss:.4f}")
        parts += [escape(os.path.basename(path)) for _, path in outputs(job)[:1]]
    else:
        steps = steps_text(job, seen, width=40)
        if steps:
            parts.append(steps if not steps[0].isdigit() else f"train {steps}")
        if loss is not None and _stage(job, seen) == "train":
            parts.append(f"avg loss {loss:.4f}")
        eta = eta_text(job, seen, now)
        if eta:
            parts.append(f"ETA {eta}")
    if job.attempts:
        parts.append(f"{job.attempts} worker restart(s)")
    if job.error:
        parts.append(f"[{ERROR}]{escape(job.error)}[/]")
    return parts


def job_line(job: pb.Job, seen: Seen) -> str:
    """The queue's line about the job under the cursor: what a done job left (its steps, final
    loss and files), where a failed one stopped and why, what a running one does."""
    state = state_name(job.state)
    loss = avg_loss(job, seen)
    loss_part = f", avg loss {loss:.4f}" if loss is not None else ""
    if job.state == pb.DONE:
        steps = f"{seen.train.done} steps" if seen.train else "trained"
        files = ", ".join(f"{os.path.basename(path)} ({kind})" for kind, path in outputs(job))
        return f"{job.id} done: {steps}{loss_part}  ·  {files or 'no LoRA file'}"
    if job.state == pb.REVIEW:
        return f"{job.id} review: the daemon captioned its images; press e to look them over, edit and accept"
    steps = steps_text(job, seen, width=40)
    where = f" at {steps if not steps[:1].isdigit() else 'train ' + steps}" if steps else ""
    if job.error:
        return f"{job.id} {state}{where}: {job.error}"
    return f"{job.id} {state}{where}{loss_part}"
