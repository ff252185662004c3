"""The daemon's home: one private folder holding everything a daemon owns.

<home>/                 mode 0700
    inbox/              datasets are dropped here
    outputs/<job-id>/   everything a job writes
    models/             base checkpoints a request may name
    cache/              latent cache (kept outside the datasets)
    state.sqlite        jobs and events
    daemon.sock         the default socket, mode 0600
    daemon.log          the daemon's log
    daemon.lock         held while a daemon runs, so two never share a home
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from loradrop.errors import UserError
from loradrop.home_path import default_home  # noqa: F401  (shared with the clients: $LORADROP_HOME, else XDG)


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def database(self) -> Path:
        return self.root / "state.sqlite"

    @property
    def socket(self) -> Path:
        return self.root / "daemon.sock"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def lock(self) -> Path:
        return self.root / "daemon.lock"

    def create(self) -> "Home":
        """Make the folders (private to this user) and return the home with its path resolved."""
        root = self.root.expanduser()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)  # an existing home made with a looser umask is tightened
        home = Home(root.resolve())
        for folder in (home.inbox, home.outputs, home.models, home.cache):
            folder.mkdir(exist_ok=True)
        return home

    def job_dir(self, job_id: str) -> Path:
        return self.outputs / job_id


class HomeLock:
    """An exclusive flock on daemon.lock; the kernel drops it when the process dies, even by kill -9."""

    def __init__(self, home: Home):
        self.path = home.lock
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise UserError(
                f"another daemon is already running on {home.root} (it holds {self.path}); stop it or use another --home."
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        os.close(self._fd)
