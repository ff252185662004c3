"""The inbox: a folder dropped or copied in becomes a job once nothing in it has changed for a
while (the quiet time), so a folder still being copied never starts early.

Two sources feed it: watchdog's file events (fast: any change inside a folder restarts its quiet
time at once) and a periodic scan that compares each waiting folder's size signature (sure: it
sees changes an event queue may drop). Folders are followed by inode, so a rename keeps its
identity; names starting with a dot are ignored (uploads are unpacked under such names).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .intake import Intake, folder_key
from .security import printable, tree

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    path: Path
    signature: tuple[int, int, int]
    changed: float  # monotonic time of the last change seen


class InboxWatcher:
    def __init__(self, inbox: Path, quiet_seconds: float, intake: Intake):
        self.inbox, self.quiet, self.intake = inbox, quiet_seconds, intake
        self._waiting: dict[str, _Waiting] = {}
        self._taken: dict[str, Path] = {}  # folders that have a job: followed for renames and removal
        self._touched: set[str] = set()  # top-level names watchdog reported since the last scan
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._observer = Observer()
        self._thread = threading.Thread(target=self._run, name="inbox-watcher", daemon=True)

    def start(self) -> None:
        entries = self._entries()
        self.intake.forget_missing(set(entries))
        now = time.monotonic()
        for key, path in entries.items():
            if self.intake.known(key):
                self._taken[key] = path
            else:  # present at start and never taken: picked up once it is quiet
                self._waiting[key] = _Waiting(path, _signature(path), now)
        self._observer.schedule(_Touches(self), str(self.inbox), recursive=True)
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._observer.stop()
        self._observer.join(timeout=5)
        self._thread.join(timeout=5)

    def waiting(self) -> list[str]:
        """The folders still waiting to be quiet; one a client submitted meanwhile waits no more."""
        with self._lock:
            waiting = list(self._waiting.items())
        return sorted(printable(w.path.name) for key, w in waiting if not self.intake.known(key))

    def touched(self, path: str) -> None:
        rel = os.path.relpath(path, self.inbox)
        top = rel.split(os.sep, 1)[0]
        if top in (".", "..") or top.startswith("."):
            return
        with self._lock:
            self._touched.add(top)
        self._wake.set()

    # ------------------------------------------------------------------ the scan

    def _run(self) -> None:
        interval = min(0.5, max(0.05, self.quiet / 4))
        last_error = ""
        while not self._stopping:
            try:
                self._scan()
                last_error = ""
            except Exception as e:  # the watcher must outlive any one odd folder
                if repr(e) != last_error:  # once, not several times a second for as long as it lasts
                    log.exception("inbox scan failed")
                last_error = repr(e)
            self._wake.wait(interval)
            self._wake.clear()

    def _scan(self) -> None:
        entries = self._entries()
        with self._lock:
            touched, self._touched = self._touched, set()
        for key, path in list(self._taken.items()):
            if key not in entries:
                del self._taken[key]
                self.intake.folder_removed(key)
            elif entries[key] != path:
                self._taken[key] = entries[key]
                self.intake.folder_moved(key, entries[key])
        now = time.monotonic()
        ready = []
        with self._lock:
            for key in list(self._waiting):
                if key not in entries:
                    del self._waiting[key]
            for key, path in entries.items():
                if key in self._taken:
                    continue
                if key in self._waiting and self.intake.known(key):  # submitted by a client while it waited
                    del self._waiting[key]
                    self._taken[key] = path
                    continue
                waiting = self._waiting.get(key)
                signature = _signature(path)
                if waiting is None:
                    self._waiting[key] = _Waiting(path, signature, now)
                elif signature != waiting.signature or path.name in touched or waiting.path != path:
                    waiting.path, waiting.signature, waiting.changed = path, signature, now
                elif now - waiting.changed >= self.quiet and signature[0] > 0:
                    del self._waiting[key]
                    ready.append((key, path))
        failed = None
        for key, path in ready:
            self._taken[key] = path
            if not self.intake.known(key):  # a client may have submitted it meanwhile
                try:
                    self.intake.folder_ready(path, key)
                except (
                    Exception
                ) as e:  # the store could not take it (a full disk): it waits, and is tried again
                    del self._taken[key]
                    with self._lock:
                        self._waiting[key] = _Waiting(path, _signature(path), time.monotonic())
                    failed = e
        if failed is not None:
            raise failed

    def _entries(self) -> dict[str, Path]:
        entries = {}
        with os.scandir(self.inbox) as it:
            for entry in it:
                if entry.name.startswith(".") or not (entry.is_symlink() or _is_dir(entry)):
                    continue
                try:
                    entries[folder_key(Path(entry.path))] = Path(entry.path)
                except FileNotFoundError:
                    continue  # removed while listing
        return entries


def _signature(path: Path) -> tuple[int, int, int]:
    """(files, bytes, newest mtime) of a folder; a symlink is judged by itself, never walked
    (it may point anywhere, and the intake refuses those that leave the inbox)."""
    if path.is_symlink():
        st = path.lstat()
        return (1, 0, st.st_mtime_ns)
    files = size = newest = 0
    for entry in tree(path):
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:  # removed meanwhile, or a path longer than the system takes
            continue
        is_file = not _is_dir(entry)
        newest = max(newest, st.st_mtime_ns)
        files += is_file
        size += st.st_size if is_file else 0
    return (files, size, newest)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


class _Touches(FileSystemEventHandler):
    def __init__(self, watcher: InboxWatcher):
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads (our own scans, the worker's) are not changes
        self._watcher.touched(os.fsdecode(event.src_path))
        if getattr(event, "dest_path", ""):
            self._watcher.touched(os.fsdecode(event.dest_path))
