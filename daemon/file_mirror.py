"""Files between the daemon's home and a Ray node that cannot see it, in chunks.

Both ends use it: the daemon sends a job's dataset, checkpoints and base model to the node; the
node sends back what the job writes under its outputs as soon as each file is complete (a
checkpoint, a sample, a LoRA), so nothing a job made is lost with its node. A file arrives under a
temporary name and is renamed when all its chunks are in: a reader never sees half of one, and a
transfer cut off leaves a partial file that `sweep_partials` removes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from loradrop.fsutil import finish_partial, is_partial, partial_path

CHUNK = 4 << 20  # bytes per message: large enough to stream fast, small enough to interleave events


@dataclass(frozen=True)
class Stamp:
    """What tells two copies of a file apart without reading them."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "Stamp":
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class FileChunk:
    path: str  # relative to the root both ends agree on, "/"-separated
    offset: int
    data: bytes
    stamp: Stamp  # the whole file's; the receiver sets the mtime, so the copy stamps the same


def relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def inside(root: Path, rel: str) -> Path:
    """`root`/`rel`, refusing a path that would lead out of `root` (a node must not write anywhere)."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise ValueError(f"a file name from a node leads out of its folder: {rel!r}")
    return root.joinpath(*parts)


def chunks(path: Path, rel: str) -> Iterator[FileChunk]:
    """The chunks of the file at `path`, named `rel` for the receiver, as it is now (a file still
    growing, like a tensorboard log, is cut at its size when opened); an empty file is one chunk."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())  # of the file opened: a rename over it since does not matter
        stamp, offset = Stamp(st.st_size, st.st_mtime_ns), 0
        while True:
            data = f.read(min(CHUNK, stamp.size - offset))
            yield FileChunk(rel, offset, data, stamp)
            offset += len(data)
            if offset >= stamp.size or not data:
                return


def files_under(root: Path, folder: Path) -> list[str]:
    """The complete regular files under `folder` (partial ones skipped), relative to `root`."""
    found = []
    for where, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(where, name)
            if not is_partial(name) and path.is_file():
                found.append(relative(root, path))
    return sorted(found)


@dataclass
class _Arriving:
    tmp: Path
    fd: int
    stamp: Stamp
    got: set[int]  # the offsets written
    size: int = 0  # bytes written


class Receiver:
    """Writes arriving chunks under `root`: each file under a temporary name until all its chunks
    are in. Chunks may come in any order (a threaded Ray actor runs its calls as they come) and
    from several threads at once."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()
        self._open: dict[str, _Arriving] = {}
        self._newest: dict[str, Stamp] = {}  # per file, the stamp of the newest version begun

    def take(self, chunk: FileChunk) -> Path | None:
        """Write one chunk; the file's final path once it is complete, else None."""
        target = inside(self.root, chunk.path)
        with self._lock:
            newest = self._newest.get(chunk.path)
            if newest is not None and chunk.stamp.mtime_ns < newest.mtime_ns:
                return None  # a late chunk of a version already replaced: never let it win
            self._newest[chunk.path] = chunk.stamp
            arriving = self._open.get(chunk.path)
            if arriving is None or arriving.stamp != chunk.stamp:  # new, or sent again as it changed
                self.drop(chunk.path)
                tmp = partial_path(target)
                arriving = self._open[chunk.path] = _Arriving(
                    tmp, os.open(tmp, os.O_WRONLY), chunk.stamp, set()
                )
            if chunk.offset not in arriving.got:
                os.pwrite(arriving.fd, chunk.data, chunk.offset)
                arriving.got.add(chunk.offset)
                arriving.size += len(chunk.data)
            if arriving.size < chunk.stamp.size:
                return None
            del self._open[chunk.path]
        os.close(arriving.fd)
        os.utime(arriving.tmp, ns=(chunk.stamp.mtime_ns, chunk.stamp.mtime_ns))
        finish_partial(arriving.tmp, target)
        return target

    def drop(self, rel: str) -> None:
        arriving = self._open.pop(rel, None)
        if arriving is not None:
            os.close(arriving.fd)
            arriving.tmp.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            for rel in list(self._open):
                self.drop(rel)


class Watcher:
    """Which files under a folder are new or changed since last asked (or since they were received)."""

    def __init__(self, root: Path, folder: Path):
        self.root, self.folder = root, folder
        self._seen: dict[str, Stamp] = {}

    def know(self, rel: str, stamp: Stamp) -> None:
        self._seen[rel] = stamp

    def forget(self, prefix: str) -> None:
        for rel in [r for r in self._seen if r.startswith(prefix)]:
            del self._seen[rel]

    def changed(self) -> list[str]:
        fresh = []
        for rel in files_under(self.root, self.folder):
            try:
                stamp = Stamp.of(inside(self.root, rel))
            except FileNotFoundError:
                continue  # replaced or removed between the listing and now
            if self._seen.get(rel) != stamp:
                self._seen[rel] = stamp
                fresh.append(rel)
        return fresh
