"""`loradrop accept JOB`: let a job waiting for caption review go on to train."""

from __future__ import annotations


def add_parser(sub) -> None:
    from loradrop.proto.connect import add_arguments

    p = sub.add_parser(
        "accept",
        help="accept the captions of a job waiting for review",
        description="Accept the captions the daemon wrote for a job whose loradrop.toml says `review = true`; the job is queued "
        "and trains on the dataset's caption files as they are now (edit them first if need be).",
    )
    p.add_argument("job", help="the job's id or number")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from loradrop.commands.jobs import job_line
    from loradrop.proto.client import Client

    with Client.from_args(args) as daemon:
        print(job_line(daemon.accept_captions(args.job)))
    return 0
