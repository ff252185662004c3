"""The daemon's memory across restarts: jobs and their events in one sqlite file (WAL).

A job's state moves queued → running → done | failed | cancelled; a crash or a stop moves a
running job back to queued, marked interrupted: it runs again before every job that has not
started yet. A job whose images the daemon captioned, with `review = true`, waits in review
(running → review) until a person accepts the captions (review → queued, marked accepted). Every state change is stored together with its event, in one transaction, so a
reader that sees the new state also finds the event that announced it.

A full disk must not cost a state change: the store keeps a reserve file beside the database and
gives its space up to sqlite when a write finds the disk full (the write is tried again). A file
that is not a database (random bytes, cut short) is moved aside, never deleted, with a sentence
that says how to start fresh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from loradrop.engine.events import Event as Body
from loradrop.engine.events import Progress, StateChange, encode

from .errors import BadStore, DiskFull
from .records import (
    QUEUED,
    REVIEW,
    RUNNING,
    TERMINAL,
    CaptionSettings,
    Event,
    Job,
    JobFiles,
    event_from_row,
    job_from_row,
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    number       INTEGER PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    state        TEXT NOT NULL,
    source       TEXT NOT NULL,
    dataset      TEXT NOT NULL,
    inbox_key    TEXT,
    model        TEXT,
    block_vector TEXT,
    recipe       TEXT,
    created      REAL NOT NULL,
    started      REAL,
    ended        REAL,
    error        TEXT NOT NULL DEFAULT '',
    attempts     INTEGER NOT NULL DEFAULT 0,
    progress     TEXT,
    result       TEXT NOT NULL DEFAULT '{}',
    last_seq     INTEGER NOT NULL DEFAULT 0,
    interrupted  INTEGER NOT NULL DEFAULT 0,
    captions     TEXT,
    pin          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_inbox_key ON jobs(inbox_key);
CREATE TABLE IF NOT EXISTS events (
    gseq    INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    time    REAL NOT NULL,
    kind    TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
"""


RESERVE_BYTES = 8 << 20  # what the reserve file holds back for sqlite on a full disk
_BAD = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


class Store:
    def __init__(self, path: Path):
        self.path = path
        self._reserve = path.with_name(path.name + ".reserve")
        self._lock = threading.RLock()
        self._refill_after = 0.0
        try:
            self._open()
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorcode", None) not in _BAD and not isinstance(e, _Damaged):
                raise
            raise BadStore(_set_aside(path, e)) from None

    def _open(self) -> None:
        # One connection shared under a lock: the daemon's writes are few and small, and one
        # writer keeps sqlite from ever answering "database is locked".
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes, fast
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _Damaged(check)
            self._db.executescript(_SCHEMA)
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "interrupted" not in columns:  # a database from before the column
                self._db.execute("ALTER TABLE jobs ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0")
            if "captions" not in columns:  # a database from before the caption stage
                self._db.execute("ALTER TABLE jobs ADD COLUMN captions TEXT")
            if "pin" not in columns:  # a database from before jobs could be pinned to a cluster's nodes
                self._db.execute("ALTER TABLE jobs ADD COLUMN pin TEXT NOT NULL DEFAULT ''")
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `body` in one transaction; when the disk is full, give sqlite the reserve's space
        and try once more, then say "disk full" (DiskFull)."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        result = body(self._db)
                        self._db.execute("COMMIT")
                    except BaseException:
                        if self._db.in_transaction:
                            self._db.execute("ROLLBACK")
                        raise
                except sqlite3.OperationalError as e:
                    if not self._is_full(e):
                        raise
                    if attempt == 1 and self._reserve.exists():
                        log.warning(
                            "the disk under %s is full; giving the store its reserve of %d MB",
                            self.path.parent,
                            RESERVE_BYTES >> 20,
                        )
                        self._reserve.unlink()
                        continue
                    raise DiskFull(
                        f"disk full: the job database {self.path} cannot be written (no space left on its disk); free some space."
                    ) from None
                if time.monotonic() > self._refill_after:  # the space may be back: hold the reserve again
                    self._refill_after = time.monotonic() + 30
                    self._refill_reserve()
                return result

    def _is_full(self, e: sqlite3.OperationalError) -> bool:
        code = getattr(e, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            return True
        try:  # an I/O error on a disk without space left is the same thing, said differently
            st = os.statvfs(self.path.parent)
            return code == sqlite3.SQLITE_IOERR and st.f_bavail * st.f_frsize < RESERVE_BYTES
        except OSError:
            return False

    def _refill_reserve(self) -> None:
        """Put the reserve back when there is room for it and to spare."""
        if self._reserve.exists():
            return
        try:
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < 4 * RESERVE_BYTES:
                return
            with open(self._reserve, "wb") as f:
                f.truncate(RESERVE_BYTES)
                os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)  # real blocks, not a sparse file
        except OSError:
            self._reserve.unlink(missing_ok=True)

    # ------------------------------------------------------------------ jobs

    def add_job(
        self,
        *,
        name: str,
        source: str,
        dataset: str,
        inbox_key: str | None,
        model: str | None,
        block_vector: str | None,
        recipe: dict[str, Any] | None,
        captions: CaptionSettings | None = None,
        pin: str = "",
        state: str = QUEUED,
        error: str = "",
    ) -> tuple[Job, Event]:
        """Record a job; returns it with its first event (its state)."""
        now = time.time()

        def add(db):
            number = db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM jobs").fetchone()[0]
            job_id = f"{number:04d}-{name}"
            db.execute(
                "INSERT INTO jobs (number, id, name, state, source, dataset, inbox_key, model, block_vector, recipe, created, ended, error, captions, pin)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    number,
                    job_id,
                    name,
                    state,
                    source,
                    dataset,
                    inbox_key,
                    model,
                    block_vector,
                    None if recipe is None else json.dumps(recipe),
                    now,
                    now if state in TERMINAL else None,
                    error,
                    None if captions is None else json.dumps(dataclasses.asdict(captions)),
                    pin,
                ),
            )
            event = self._insert_event(db, job_id, StateChange(state, error), now)
            return self._get(db, job_id), event

        return self._write(add)

    def get(self, ref: str) -> Job | None:
        """A job by its id or by its number."""
        with self._lock:
            if ref.isascii() and ref.isdigit():  # not "²" or "٣", which int() refuses
                if int(ref) >= 2**63:  # more than sqlite's integers hold: no such job
                    return None
                row = self._db.execute("SELECT * FROM jobs WHERE number = ?", (int(ref),)).fetchone()
            else:
                row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (ref,)).fetchone()
            return job_from_row(row) if row else None

    def jobs(self, states: Iterable[str] = ()) -> list[Job]:
        states = list(states)
        with self._lock:
            if states:
                marks = ",".join("?" * len(states))
                rows = self._db.execute(
                    f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY number", states
                )
            else:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY number")
            return [job_from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def inbox_jobs(self, key: str) -> list[Job]:
        """The jobs made from the inbox folder with this key (its inode)."""
        with self._lock:
            return [
                job_from_row(r)
                for r in self._db.execute("SELECT * FROM jobs WHERE inbox_key = ? ORDER BY number", (key,))
            ]

    def claim_next(self, accept: Callable[[str], bool] = lambda pin: True) -> tuple[Job, Event] | None:
        """The next queued job, now running: interrupted ones first (they hold a checkpoint and
        had their turn already), then the oldest. A pinned job is taken only if `accept(pin)`
        (the worker's node offers that resource); one it refuses waits for another worker and
        does not hold up the jobs behind it."""

        def claim(db):
            verdicts: dict[str, bool] = {"": True}  # asked once per pin: many queued jobs may share one
            for row in db.execute(
                "SELECT id, pin FROM jobs WHERE state = ? ORDER BY interrupted DESC, number", (QUEUED,)
            ).fetchall():
                if row["pin"] not in verdicts:
                    verdicts[row["pin"]] = accept(row["pin"])
                if verdicts[row["pin"]]:
                    return self._transition(db, row["id"], RUNNING, "", {QUEUED}, attempts=None)
            return None

        return self._write(claim)

    def transition(
        self, job_id: str, state: str, *, error: str = "", expect: Iterable[str], attempts: int | None = None
    ) -> tuple[Job, Event] | None:
        """Move a job to `state` if it is in one of `expect`; None if it was not."""
        return self._write(lambda db: self._transition(db, job_id, state, error, set(expect), attempts))

    def _transition(self, db, job_id, state, error, expect, attempts):
        now = time.time()
        sets = ["state = ?", "error = ?"]
        args: list[Any] = [state, error]
        if state == RUNNING:
            sets += ["started = ?", "progress = NULL"]  # progress is of the current run only
            args.append(now)
        if state == QUEUED:  # back from running: interrupted; queued anew (a retry): not
            sets += ["started = NULL", "ended = NULL", f"interrupted = (state = '{RUNNING}')"]
        if state in TERMINAL:
            sets.append("ended = ?")
            args.append(now)
        if attempts is not None:
            sets.append("attempts = ?")
            args.append(attempts)
        marks = ",".join("?" * len(expect))
        cur = db.execute(
            f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state IN ({marks})", [*args, job_id, *expect]
        )
        if cur.rowcount == 0:
            return None
        event = self._insert_event(db, job_id, StateChange(state, error), now)
        return self._get(db, job_id), event

    def set_result(self, job_id: str, result: JobFiles) -> None:
        self._write(
            lambda db: db.execute(
                "UPDATE jobs SET result = ? WHERE id = ?", (json.dumps(dataclasses.asdict(result)), job_id)
            )
        )

    def set_inbox(self, job_id: str, dataset: str, inbox_key: str | None) -> None:
        self._write(
            lambda db: db.execute(
                "UPDATE jobs SET dataset = ?, inbox_key = ? WHERE id = ?", (dataset, inbox_key, job_id)
            )
        )

    def set_settings(
        self,
        job_id: str,
        model: str | None,
        block_vector: str | None,
        recipe: dict[str, Any],
        captions: CaptionSettings,
        pin: str,
    ) -> None:
        self._write(
            lambda db: db.execute(
                "UPDATE jobs SET model = ?, block_vector = ?, recipe = ?, captions = ?, pin = ? WHERE id = ?",
                (
                    model,
                    block_vector,
                    json.dumps(recipe),
                    json.dumps(dataclasses.asdict(captions)),
                    pin,
                    job_id,
                ),
            )
        )

    def accept_captions(self, job_id: str) -> tuple[Job, Event] | None:
        """A job in review, queued again with its captions marked accepted (so the caption stage
        does not hold it a second time), in one transaction; None if it was not in review."""

        def accept(db):
            changed = self._transition(db, job_id, QUEUED, "", {REVIEW}, attempts=None)
            if changed is not None:
                captions = dataclasses.replace(changed[0].captions or CaptionSettings(), accepted=True)
                db.execute(
                    "UPDATE jobs SET captions = ? WHERE id = ?",
                    (json.dumps(dataclasses.asdict(captions)), job_id),
                )
                changed = (self._get(db, job_id), changed[1])
            return changed

        return self._write(accept)

    # ------------------------------------------------------------------ events

    def add_event(self, job_id: str, body: Body, at: float | None = None) -> Event:
        def add(db):
            if isinstance(body, Progress) and job_id:
                db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(encode(body)[1]), job_id))
            return self._insert_event(db, job_id, body, time.time() if at is None else at)

        return self._write(add)

    def _insert_event(self, db, job_id: str, body: Body, now: float) -> Event:
        kind, fields = encode(body)
        text = json.dumps(fields)
        if job_id:
            db.execute("UPDATE jobs SET last_seq = last_seq + 1 WHERE id = ?", (job_id,))
            seq = db.execute("SELECT last_seq FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            gseq = db.execute(
                "INSERT INTO events (job_id, seq, time, kind, payload) VALUES (?, ?, ?, ?, ?)",
                (job_id, seq, now, kind, text),
            ).lastrowid
        else:
            gseq = db.execute(
                "INSERT INTO events (job_id, seq, time, kind, payload) VALUES ('', 0, ?, ?, ?)",
                (now, kind, text),
            ).lastrowid
            db.execute("UPDATE events SET seq = gseq WHERE gseq = ?", (gseq,))
            seq = gseq
        return Event(gseq, job_id, seq, now, body)

    def events_after(self, job_id: str | None, since: int, limit: int) -> tuple[list[Event], int]:
        """Up to `limit` events after `since` (the job's seq, or the global one without a job),
        and the newest global number at the time of reading."""
        with self._lock:
            if job_id:
                rows = self._db.execute(
                    "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (job_id, since, limit),
                )
            else:
                rows = self._db.execute(
                    "SELECT * FROM events WHERE gseq > ? ORDER BY gseq LIMIT ?", (since, limit)
                )
            events = [event_from_row(r) for r in rows]
            return events, self.last_gseq()

    def job_events(self, job_id: str, kind: str) -> list[Event]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE job_id = ? AND kind = ? ORDER BY seq", (job_id, kind)
            )
            return [event_from_row(r) for r in rows]

    def event(self, job_id: str, seq: int) -> Event | None:
        if seq < 1:  # numbers start at 1 (and seq - 1 must stay inside sqlite's integers)
            return None
        events, _ = self.events_after(job_id, seq - 1, 1)
        return events[0] if events and events[0].seq == seq else None

    def last_gseq(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(gseq), 0) FROM events").fetchone()[0]

    def _get(self, db, job_id: str) -> Job:
        return job_from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


class _Damaged(sqlite3.DatabaseError):
    """quick_check found damage that opening the file did not."""


def _set_aside(path: Path, error: Exception) -> str:
    """Move a damaged database (and its WAL) aside, never delete it; the sentence that says so."""
    aside, n = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}"), 1
    while aside.exists():  # an earlier one of the same second stays too
        n += 1
        aside = aside.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            os.replace(part, f"{aside}{suffix}")
    return (
        f"{path} is not a readable job database ({error}); it was moved aside to {aside} (kept, not deleted), so "
        "`loradrop daemon` starts afresh with an empty queue the next time (the files in outputs/ stay where they are)."
    )
