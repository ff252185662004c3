"""Writing files so that a crash never leaves a half-written one under the real name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

_PARTIAL = ".partial"
_PROC_SELF = Path("/proc/self/stat")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    The temporary name starts with a dot and ends in `.partial`, so listings that skip hidden
    or partial files never see an incomplete artifact; it carries the writer's pid, so the one
    a killed process leaves behind can be told from one still being written (`sweep_partials`).
    """
    path = Path(path)
    tmp_path = partial_path(path)
    try:
        yield tmp_path
        finish_partial(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def partial_path(path: Path) -> Path:
    """A new empty temporary file beside `path`, named as `atomic_path` names them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_PARTIAL, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def finish_partial(tmp_path: Path, path: Path) -> None:
    """fsync the finished temporary file and rename it over `path`."""
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the umask).
    os.chmod(tmp_path, 0o666 & ~_umask())
    os.replace(tmp_path, path)
    _fsync_dir(path.parent)


def is_partial(name: str) -> bool:
    """A temporary name of `atomic_path`'s: a file still being written (or left by a crash)."""
    return name.startswith(".") and name.endswith(_PARTIAL)


def sweep_partials(root: str | os.PathLike) -> list[Path]:
    """Remove the temporary files under `root` whose writer is no longer running; return them."""
    removed = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            pid = _writer(name)
            if pid is not None and not process_running(pid):
                path = Path(folder, name)
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _writer(name: str) -> int | None:
    """The pid in a name atomic_path made (`.<name>.<pid>.<random>.partial`), or None."""
    if not is_partial(name):
        return None
    parts = name[: -len(_PARTIAL)].rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def process_running(pid: int) -> bool:
    """Whether process `pid` still runs: it exists (anyone's) and is not a zombie (exited, not
    yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    if not _PROC_SELF.exists():  # no /proc to ask: existing is running
        return True
    try:
        # "pid (name) state ...": the name may hold spaces and parentheses; the state follows the last ")".
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:  # gone meanwhile
        return False


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
