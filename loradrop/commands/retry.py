"""`loradrop retry JOB`: queue a failed or cancelled job again; it resumes from its last checkpoint."""

from __future__ import annotations


def add_parser(sub) -> None:
    from loradrop.proto.connect import add_arguments

    p = sub.add_parser("retry", help="queue a failed or cancelled job again", description="Queue a failed or cancelled job again; it continues from its last full checkpoint.")
    p.add_argument("job", help="the job's id or number")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from loradrop.commands.jobs import job_line
    from loradrop.proto.client import Client

    with Client.from_args(args) as daemon:
        print(job_line(daemon.retry(args.job)))
    return 0
