"""`loradrop jobs`: the daemon's queue, one line per job."""

from __future__ import annotations


def add_parser(sub) -> None:
    from loradrop.daemon.store import STATES
    from loradrop.proto.connect import add_arguments

    p = sub.add_parser("jobs", help="list the daemon's jobs", description="List the daemon's jobs, oldest first, with their state and progress.")
    p.add_argument("--state", action="append", choices=STATES, help="only jobs in this state (repeatable)")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from loradrop.proto.client import Client

    with Client.from_args(args) as daemon:
        jobs = daemon.jobs(args.state or ())
    if not jobs:
        print("no jobs")
    for job in jobs:
        print(job_line(job))
    return 0


def job_line(job) -> str:
    """`0007-cats  running  train 12/80 loss 0.1234  eta 1m05s`, or the error of a failed job."""
    from loradrop.proto.client import state_name

    state = state_name(job.state)
    parts = [f"{job.id:<28}", f"{state:<9}"]
    if state == "running" and job.HasField("progress"):
        p = job.progress
        parts.append(f"{p.stage} {p.done}/{p.total}")
        if p.HasField("loss"):
            parts.append(f"loss {p.loss:.4f}")
        if p.HasField("eta_s"):
            parts.append(f"eta {duration(p.eta_s)}")
    if job.error:
        parts.append(job.error)
    elif state == "done":
        parts.append(job.chopped or job.resized or job.final)
    return "  ".join(parts).rstrip()


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
