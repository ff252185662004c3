"""How many calls of each long-lived kind the server takes at once, and how long a stream may idle.

Every call holds one of the server's threads until it ends: an event stream for as long as its
client follows, an upload or a download for as long as its client sends or reads, a tool call
for as long as the worker takes. Each kind has a gate (past it: RESOURCE_EXHAUSTED at once, never
a wait for a thread that does not come), the gates together stay below the server's threads, and
the rest is a reserve for plain calls: Status always answers. An upload that sends nothing, or a
download whose client reads nothing, for `idle_seconds` is ended, so a stalled client cannot keep
its place for good.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import grpc

from .errors import Busy

MAX_STREAMS = 100  # StreamEvents
MAX_UPLOADS = 8  # UploadDataset; at most half of them from one client host (over TCP)
MAX_DOWNLOADS = 8  # DownloadArtifact
MAX_TOOL_CALLS = 8  # BlockLayout, Chop, Resize, Preview waiting on a worker
RESERVE = 24  # threads only plain, quick calls (Status, ListJobs, GetJob...) can take
RPC_THREADS = MAX_STREAMS + MAX_UPLOADS + MAX_DOWNLOADS + MAX_TOOL_CALLS + RESERVE


class Gate:
    """At most `total` calls of one kind at once, and `per_host` from one client host."""

    def __init__(self, what: str, total: int, per_host: int | None = None):
        self.what, self.total, self.per_host = what, total, per_host
        self._lock = threading.Lock()
        self._open = 0
        self._by_host: dict[str, int] = {}

    @contextlib.contextmanager
    def enter(self, context: grpc.ServicerContext) -> Iterator[None]:
        host = _host(context.peer())
        with self._lock:
            if self._open >= self.total:
                raise Busy(f"{self.total} {self.what} are running already; try again when one has ended.")
            if self.per_host is not None and host and self._by_host.get(host, 0) >= self.per_host:
                raise Busy(f"{host} has {self.per_host} {self.what} running already; wait for one to end.")
            self._open += 1
            self._by_host[host] = self._by_host.get(host, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                self._by_host[host] -= 1
                if not self._by_host[host]:
                    del self._by_host[host]


def _host(peer: str) -> str:
    """The client's address without its port ("ipv4:10.0.0.5"); "" for a unix socket, where every
    client is this user (the socket is 0600) and only the total counts."""
    if not peer or peer.startswith("unix"):
        return ""
    return peer.rsplit(":", 1)[0]


class IdleWatch:
    """Ends the streams that made no progress for `seconds` (one thread watches them all)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._last: dict[int, tuple[float, grpc.ServicerContext]] = {}
        self._timed_out: set[int] = set()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, context: grpc.ServicerContext) -> Iterator["_Watched"]:
        key = id(context)
        with self._lock:
            self._last[key] = (time.monotonic(), context)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="idle-streams", daemon=True)
                self._thread.start()
        try:
            yield _Watched(self, key)
        finally:
            with self._lock:
                self._last.pop(key, None)
                self._timed_out.discard(key)

    def _touch(self, key: int) -> None:
        with self._lock:
            if key in self._last:
                self._last[key] = (time.monotonic(), self._last[key][1])

    def _expired(self, key: int) -> bool:
        with self._lock:
            return key in self._timed_out

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            now = time.monotonic()
            with self._lock:
                late = [
                    (k, c)
                    for k, (t, c) in self._last.items()
                    if now - t > self.seconds and k not in self._timed_out
                ]
                self._timed_out.update(k for k, _ in late)
            for _, context in late:
                context.cancel()  # wakes the thread blocked on the stream; it sees the time-out


class _Watched:
    def __init__(self, watch: IdleWatch, key: int):
        self._watch, self._key = watch, key

    def progressed(self) -> None:
        self._watch._touch(self._key)

    def messages(self, requests: Iterator) -> Iterator:
        """`requests`, each marking progress; a stream that idled too long ends with Busy (a cut
        stream must never read as a complete one)."""
        try:
            for request in requests:
                self.progressed()
                yield request
        except grpc.RpcError:
            if not self.timed_out:
                raise
        if self.timed_out:
            raise self.error()

    @property
    def timed_out(self) -> bool:
        return self._watch._expired(self._key)

    def error(self) -> Busy:
        return Busy(
            f"the stream made no progress for {self._watch.seconds:g} s and was ended; send it again."
        )
