"""`loradrop logs JOB [-f]`: a job's events as text; with -f, followed live until the job ends."""

from __future__ import annotations


def add_parser(sub) -> None:
    from loradrop.proto.connect import add_arguments

    p = sub.add_parser(
        "logs",
        help="show a job's log (-f: follow it live)",
        description="Print a job's events: log lines, stages, progress, samples, artifacts, state changes.",
    )
    p.add_argument("job", help="the job's id or number")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new events until the job ends (survives a daemon restart)",
    )
    p.add_argument("--since", type=int, default=0, metavar="N", help="start after the job's event number N")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from loradrop.proto.client import Client

    with Client.from_args(args) as daemon:
        job = daemon.job(args.job)  # fails now, clearly, if there is no such job
        return print_events(daemon, job.id, since=args.since, follow=args.follow)


def print_events(daemon, job_id: str, *, since: int = 0, follow: bool) -> int:
    """Print the job's events; returns 0, or 1 when a followed job ended failed or cancelled."""
    from loradrop.proto.client import state_name

    final = None
    for event in daemon.events(job_id, since, follow=follow):
        line = event_line(event)
        if line:
            print(line, flush=True)
        if event.HasField("state"):
            final = state_name(event.state.state)
    if follow and final in ("failed", "cancelled"):
        return 1
    return 0


def event_line(event) -> str:
    import time

    from loradrop.progress import describe_progress, figures_of
    from loradrop.proto.client import state_name

    stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
    body = event.WhichOneof("body")
    if body == "log":
        text = event.log.text if event.log.level == "info" else f"{event.log.level}: {event.log.text}"
    elif body == "stage":
        text = f"== {event.stage.stage}"
    elif body == "progress":
        p = event.progress
        text = f"{p.stage} {p.done}/{p.total}  {describe_progress(**figures_of(p))}".rstrip()
    elif body == "sample":
        text = f"sample (step {event.sample.step}, prompt {event.sample.prompt_index}): {event.sample.path}"
    elif body == "artifact":
        text = f"{event.artifact.kind}: {event.artifact.path}"
    elif body == "preview":
        p = event.preview
        text = f"preview {p.request_id}: image {p.image}/{p.images}, step {p.step}/{p.steps}"
    elif body == "state":
        text = f"job {state_name(event.state.state)}" + (
            f": {event.state.error}" if event.state.error else ""
        )
    else:
        text = f"{event.kind}: {event.other_json}"
    return f"{stamp} [{event.seq}] {text}"
