"""Where a client finds the daemon: the default address and the command-line options that name
another. No grpc here, so commands can declare their options without loading it (`--help` stays fast)."""

from __future__ import annotations


def default_target() -> str:
    from loradrop.daemon.home import default_home  # only the folder's name; no daemon code runs

    return f"unix:{default_home() / 'daemon.sock'}"


def add_arguments(parser) -> None:
    """--connect, --token-file and --tls-ca, for every command that talks to a daemon."""
    parser.add_argument("--connect", metavar="ADDR", help="the daemon: unix:PATH or HOST:PORT (default: the default home's socket)")
    parser.add_argument("--token-file", metavar="FILE", help="file holding the daemon's token (TCP)")
    parser.add_argument("--tls-ca", metavar="FILE", help="CA or self-signed certificate (PEM) of a TLS daemon")
