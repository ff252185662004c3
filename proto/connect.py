"""Where a client finds the daemon: the command-line options that name it, and the address they
give. No grpc here, so commands can declare their options without loading it (`--help` stays fast)."""

from __future__ import annotations

from loradrop.home_path import HOME_ENV, default_home, home_socket


def default_target() -> str:
    return f"unix:{home_socket(default_home())}"


def add_arguments(parser) -> None:
    """--home or --connect, --token-file and --tls-ca, for every command that talks to a daemon."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--home",
        metavar="DIR",
        help=f"the daemon's home: talk to its socket DIR/daemon.sock (default: ${HOME_ENV}, else ~/.local/share/loradrop)",
    )
    where.add_argument(
        "--connect", metavar="ADDR", help="the daemon's address instead: unix:PATH or HOST:PORT"
    )
    parser.add_argument("--token-file", metavar="FILE", help="file holding the daemon's token (TCP)")
    parser.add_argument(
        "--tls-ca", metavar="FILE", help="CA or self-signed certificate (PEM) of a TLS daemon"
    )


def target_from_args(args) -> str | None:
    """The address the options name (None: the default home's socket)."""
    if args.home:
        return f"unix:{home_socket(args.home)}"
    return args.connect
