"""`loradrop cancel|retry|accept JOB`: one request about one job, answered with the job's line."""

from __future__ import annotations

import functools

# (command, client method, --help line, description)
ACTIONS = [
    (
        "cancel",
        "cancel",
        "cancel a job",
        "Cancel a queued job, or stop a running one at its next step boundary.",
    ),
    (
        "retry",
        "retry",
        "queue a failed or cancelled job again",
        "Queue a failed or cancelled job again; it continues from its last full checkpoint.",
    ),
    (
        "accept",
        "accept_captions",
        "accept the captions of a job waiting for review",
        "Accept the captions the daemon wrote for a job whose loradrop.toml says `review = true`; the job is queued "
        "and trains on the dataset's caption files as they are now (edit them first if need be).",
    ),
]


def add_parser(sub) -> None:
    from loradrop.proto.connect import add_arguments

    for command, method, help_line, description in ACTIONS:
        p = sub.add_parser(command, help=help_line, description=description)
        p.add_argument("job", help="the job's id or number")
        add_arguments(p)
        p.set_defaults(func=functools.partial(run, method))


def run(method: str, args) -> int:
    from loradrop.commands.jobs import job_line
    from loradrop.proto.client import Client

    with Client.from_args(args) as daemon:
        print(job_line(getattr(daemon, method)(args.job)))
    return 0
