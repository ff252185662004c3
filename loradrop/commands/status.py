"""`loradrop status`: is the daemon up, where is its inbox, what are its workers doing."""

from __future__ import annotations


def add_parser(sub) -> None:
    from loradrop.proto.connect import add_arguments

    p = sub.add_parser(
        "status",
        help="show the daemon's state",
        description="Show the daemon's home, inbox, workers and queue.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from loradrop.progress import format_duration
    from loradrop.proto.client import Client

    with Client.from_args(args) as daemon:
        s = daemon.status()
    print(f"loradrop daemon {s.version}, pid {s.pid}, up {format_duration(time.time() - s.started)}")
    print(f"home     {s.home}")
    print(f"inbox    {s.inbox} (quiet time {s.quiet_seconds:g}s)")
    print(f"model    {s.default_model or 'the embedded tiny twin'}")
    if s.captioner:
        print(f"captions {s.captioner} (for images without one)")
    for w in s.workers:
        doing = f" running {w.job_id}" if w.job_id else ""
        print(f"worker {w.index} {w.device:<7} {w.state}{doing}" + (f" (pid {w.pid})" if w.pid else ""))
    counts = ", ".join(f"{n} {state}" for state, n in sorted(s.jobs_by_state.items())) or "no jobs"
    print(f"jobs     {counts}")
    if s.pending_folders:
        print(f"waiting  {', '.join(s.pending_folders)} (until quiet)")
    return 0
