"""`loradrop cancel JOB`: cancel a queued job, or stop a running one at its next step."""

from __future__ import annotations


def add_parser(sub) -> None:
    from loradrop.proto.connect import add_arguments

    p = sub.add_parser("cancel", help="cancel a job", description="Cancel a queued job, or stop a running one at its next step boundary.")
    p.add_argument("job", help="the job's id or number")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from loradrop.commands.jobs import job_line
    from loradrop.proto.client import Client

    with Client.from_args(args) as daemon:
        print(job_line(daemon.cancel(args.job)))
    return 0
