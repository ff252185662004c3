"""Short texts for the screens: states, progress, sizes, bars."""

from __future__ import annotations

from rich.text import Text

from loradrop.progress import format_duration
from loradrop.proto.client import state_name
from loradrop.proto.v1 import loradrop_pb2 as pb

STATE_STYLES = {"queued": "yellow", "running": "bold cyan", "done": "green", "failed": "bold red", "cancelled": "magenta"}
_EIGHTHS = " ▏▎▍▌▋▊▉█"


def state_text(state: int) -> Text:
    name = state_name(state)
    return Text(name, style=STATE_STYLES.get(name, ""))


def step_text(job: pb.Job) -> str:
    """`12/80` while training (the stage's name for other stages), empty before any progress."""
    if not job.HasField("progress") or not job.progress.total:
        return ""
    p = job.progress
    prefix = "" if p.stage == "train" else f"{p.stage} "
    return f"{prefix}{p.done}/{p.total}"


def loss_text(progress: pb.Progress) -> str:
    if progress.HasField("avg_loss"):
        return f"{progress.avg_loss:.4f}"
    if progress.HasField("loss"):
        return f"{progress.loss:.4f}"
    return ""


def eta_text(job: pb.Job) -> str:
    if job.state != pb.RUNNING or not job.HasField("progress") or not job.progress.HasField("eta_s"):
        return ""
    return format_duration(job.progress.eta_s)


def size_text(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def bar(fraction: float, width: int) -> str:
    """A horizontal bar `width` cells long, filled to `fraction` in eighths of a cell."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[part] if part else "")).ljust(width)


def weight_text(w: float) -> str:
    return f"{w:g}"
