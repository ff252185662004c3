"""The `loradrop` command. Each subcommand lives in loradrop/commands/<name>.py and registers
itself with `add_parser`; heavy imports (torch, the engine, grpc) happen inside `run`, so the
client commands and `--help` answer fast and work without torch installed."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from loradrop import __version__
from loradrop.errors import UserError

# Order is the order of `loradrop --help`.
COMMANDS = [
    # the daemon and its clients
    "daemon",
    "submit",
    "jobs",
    "logs",
    "status",
    "job_actions",  # cancel, retry, accept
    "tui",
    "montage",
    # offline tools
    "caption",
    "train",
    "recipe",
    "resize",
    "chop",
    "blocks",
    "make_tiny",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loradrop",
        description="Turn a folder of captioned images into a small, good SDXL LoRA.",
        epilog="Run `loradrop COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"loradrop {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (and show tracebacks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"loradrop.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
    )
    try:
        return args.func(args) or 0
    except UserError as e:
        if args.verbose:
            raise
        print(f"loradrop: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if args.verbose or not _is_missing_train_extra(e):
            raise
        print(
            f"loradrop: `loradrop {args.command}` needs the training engine ({e.name} is not installed); "
            "install it with: pip install 'loradrop[train]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("loradrop: interrupted", file=sys.stderr)
        return 130


def _is_missing_train_extra(e: ImportError) -> bool:
    return (e.name or "").split(".")[0] in {
        "torch",
        "diffusers",
        "transformers",
        "accelerate",
        "lycoris",
        "safetensors",
        "peft",
        "numpy",
    }


if __name__ == "__main__":
    sys.exit(main())
