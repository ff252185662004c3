"""`loradrop jobs`: the daemon's queue, one line per job."""

from __future__ import annotations

# The API's job states, named here so `--help` imports nothing (tests/daemon/test_cli.py checks them).
STATE_NAMES = ("queued", "running", "done", "failed", "cancelled", "review")


def add_parser(sub) -> None:
    from loradrop.proto.connect import add_arguments

    p = sub.add_parser(
        "jobs",
        help="list the daemon's jobs",
        description="List the daemon's jobs, oldest first, with their state and progress.",
    )
    p.add_argument(
        "--state", action="append", choices=STATE_NAMES, help="only jobs in this state (repeatable)"
    )
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
    """`0007-cats  running  train 12/80  avg loss 0.1234  ETA 01:05`, the file a done job made,
    or the error of a failed job. The loss is the running average, as the TUI shows it."""
    from loradrop.progress import format_duration
    from loradrop.proto.client import state_name

    state = state_name(job.state)
    parts = [f"{job.id:<28}", f"{state:<9}"]
    if state == "running" and job.HasField("progress"):
        p = job.progress
        parts.append(f"{p.stage} {p.done}/{p.total}")
        if p.HasField("avg_loss"):
            parts.append(f"avg loss {p.avg_loss:.4f}")
        if p.HasField("eta_s"):
            parts.append(f"ETA {format_duration(p.eta_s)}")
    if job.error:
        parts.append(job.error)
    elif state == "review":
        parts.append(f"captions written in {job.dataset}; look them over, then `loradrop accept {job.id}`")
    elif state == "done":
        parts.append(job.chopped or job.resized or job.final)
    return "  ".join(parts).rstrip()
