"""`loradrop submit DIR`: queue a dataset folder on the daemon (sent over the connection unless
it already lies in the daemon's inbox)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from loradrop.proto.connect import add_arguments

    p = sub.add_parser(
        "submit",
        help="queue a folder of captioned images on the daemon",
        description=(
            "Queue a dataset folder as a job. A folder inside the daemon's inbox is used in place; any other "
            "is sent to the daemon (files only) and unpacked into its inbox. Settings: the folder's loradrop.toml, then --set."
        ),
    )
    p.add_argument("folder", metavar="DIR", help="folder of images with same-stem .txt captions")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe setting (repeatable), e.g. --set max_train_steps=40",
    )
    p.add_argument(
        "--name", default="", help="output name (default: loradrop.toml's, else the folder's name)"
    )
    p.add_argument(
        "--model",
        default="",
        help="base checkpoint: a file name in the daemon's models/ folder (default: the daemon's)",
    )
    p.add_argument(
        "--vector",
        dest="block_vector",
        default="",
        help="block vector to chop the result with (default: loradrop.toml's, else none)",
    )
    p.add_argument("-f", "--follow", action="store_true", help="then print the job's log until it ends")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from loradrop.commands.logs import print_events
    from loradrop.errors import UserError
    from loradrop.proto.client import Client

    folder = Path(args.folder).expanduser().resolve()
    if not folder.is_dir():
        raise UserError(f"{args.folder} is not a folder; give a folder of captioned images.")
    settings = dict(
        overrides=args.overrides, name=args.name, model=args.model, block_vector=args.block_vector
    )
    with Client.from_args(args) as daemon:
        inbox = Path(daemon.status().inbox)
        if folder.parent == inbox:
            job = daemon.submit(folder, **settings)
        else:
            job = daemon.upload(folder, **settings)
        print(job.id, flush=True)
        return print_events(daemon, job.id, follow=True) if args.follow else 0
