"""Where a daemon's home is and where its socket lies, for the daemon (daemon/home.py) and for every
client that looks for it (proto/connect.py). Only paths here: no daemon code, no grpc, no torch."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "LORADROP_HOME"
SOCKET_NAME = "daemon.sock"


def default_home() -> Path:
    """$LORADROP_HOME, else $XDG_DATA_HOME/loradrop (~/.local/share/loradrop)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "loradrop"


def home_socket(home: str | os.PathLike) -> Path:
    """The socket a daemon on `home` listens on unless told otherwise."""
    return Path(home).expanduser().absolute() / SOCKET_NAME


def home_of_socket(path: str | os.PathLike) -> Path | None:
    """The home whose own socket `path` is (HOME/daemon.sock), else None (a forwarded socket, say)."""
    path = Path(path)
    return path.parent if path.name == SOCKET_NAME else None


def start_command(home: Path) -> str:
    """The command that starts a daemon on `home`: `--home` only where it is not the default one."""
    same = home.expanduser().absolute() == default_home().expanduser().absolute()
    return "loradrop daemon" if same else f"loradrop daemon --home {home}"
