"""The daemon's memory across restarts: jobs and their events in one sqlite file (WAL).

A job's state moves queued → running → done | failed | cancelled; a crash or a stop moves a
running job back to queued. Every state change is stored together with its event, in one
transaction, so a reader that sees the new state also finds the event that announced it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
TERMINAL = frozenset({DONE, FAILED, CANCELLED})

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
    last_seq     INTEGER NOT NULL DEFAULT 0
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


@dataclass(frozen=True)
class Job:
    number: int
    id: str
    name: str
    state: str
    source: str  # "inbox", "submit", "upload"
    dataset: str
    inbox_key: str | None
    model: str | None
    block_vector: str | None
    recipe: dict[str, Any] | None  # None: refused before a recipe could be resolved
    created: float
    started: float | None
    ended: float | None
    error: str
    attempts: int
    progress: dict[str, Any] | None
    result: dict[str, Any] = field(default_factory=dict)
    last_seq: int = 0


@dataclass(frozen=True)
class Event:
    gseq: int
    job_id: str  # "" for the daemon's own events
    seq: int  # per job; for daemon events the same as gseq
    time: float
    kind: str
    payload: dict[str, Any]


class Store:
    def __init__(self, path: Path):
        # One connection shared under a lock: the daemon's writes are few and small, and one
        # writer keeps sqlite from ever answering "database is locked".
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes, fast
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Transaction(self._db, self._lock)

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
        state: str = QUEUED,
        error: str = "",
    ) -> tuple[Job, Event]:
        """Record a job; returns it with its first event (its state)."""
        now = time.time()
        with self._tx() as db:
            number = db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM jobs").fetchone()[0]
            job_id = f"{number:04d}-{name}"
            db.execute(
                "INSERT INTO jobs (number, id, name, state, source, dataset, inbox_key, model, block_vector, recipe, created, ended, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (number, job_id, name, state, source, dataset, inbox_key, model, block_vector,
                 None if recipe is None else json.dumps(recipe), now, now if state in TERMINAL else None, error),
            )
            event = self._insert_event(db, job_id, "state", {"state": state, "error": error}, now)
            return self._get(db, job_id), event

    def get(self, ref: str) -> Job | None:
        """A job by its id or by its number."""
        with self._lock:
            if ref.isascii() and ref.isdigit():  # not "²" or "٣", which int() refuses
                if int(ref) >= 2**63:  # more than sqlite's integers hold: no such job
                    return None
                row = self._db.execute("SELECT * FROM jobs WHERE number = ?", (int(ref),)).fetchone()
            else:
                row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (ref,)).fetchone()
            return _job(row) if row else None

    def jobs(self, states: Iterable[str] = ()) -> list[Job]:
        states = list(states)
        with self._lock:
            if states:
                marks = ",".join("?" * len(states))
                rows = self._db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY number", states)
            else:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY number")
            return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def inbox_jobs(self, key: str) -> list[Job]:
        """The jobs made from the inbox folder with this key (its inode)."""
        with self._lock:
            return [_job(r) for r in self._db.execute("SELECT * FROM jobs WHERE inbox_key = ? ORDER BY number", (key,))]

    def claim_next(self) -> tuple[Job, Event] | None:
        """The oldest queued job, now running."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY number LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            return self._transition(db, row["id"], RUNNING, "", {QUEUED}, attempts=None)

    def transition(self, job_id: str, state: str, *, error: str = "", expect: Iterable[str], attempts: int | None = None) -> tuple[Job, Event] | None:
        """Move a job to `state` if it is in one of `expect`; None if it was not."""
        with self._tx() as db:
            return self._transition(db, job_id, state, error, set(expect), attempts)

    def _transition(self, db, job_id, state, error, expect, attempts):
        now = time.time()
        sets = ["state = ?", "error = ?"]
        args: list[Any] = [state, error]
        if state == RUNNING:
            sets += ["started = ?", "progress = NULL"]  # progress is of the current run only
            args.append(now)
        if state == QUEUED:
            sets += ["started = NULL", "ended = NULL"]
        if state in TERMINAL:
            sets.append("ended = ?")
            args.append(now)
        if attempts is not None:
            sets.append("attempts = ?")
            args.append(attempts)
        marks = ",".join("?" * len(expect))
        cur = db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state IN ({marks})", [*args, job_id, *expect])
        if cur.rowcount == 0:
            return None
        event = self._insert_event(db, job_id, "state", {"state": state, "error": error}, now)
        return self._get(db, job_id), event

    def set_result(self, job_id: str, result: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET result = ? WHERE id = ?", (json.dumps(result), job_id))

    def set_inbox(self, job_id: str, dataset: str, inbox_key: str | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET dataset = ?, inbox_key = ? WHERE id = ?", (dataset, inbox_key, job_id))

    def set_settings(self, job_id: str, model: str | None, block_vector: str | None, recipe: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET model = ?, block_vector = ?, recipe = ? WHERE id = ?", (model, block_vector, json.dumps(recipe), job_id))

    # ------------------------------------------------------------------ events

    def add_event(self, job_id: str, kind: str, payload: dict[str, Any], at: float | None = None) -> Event:
        with self._tx() as db:
            if kind == "progress" and job_id:
                db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(payload), job_id))
            return self._insert_event(db, job_id, kind, payload, time.time() if at is None else at)

    def _insert_event(self, db, job_id: str, kind: str, payload: dict[str, Any], now: float) -> Event:
        text = json.dumps(payload)
        if job_id:
            db.execute("UPDATE jobs SET last_seq = last_seq + 1 WHERE id = ?", (job_id,))
            seq = db.execute("SELECT last_seq FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            gseq = db.execute("INSERT INTO events (job_id, seq, time, kind, payload) VALUES (?, ?, ?, ?, ?)", (job_id, seq, now, kind, text)).lastrowid
        else:
            gseq = db.execute("INSERT INTO events (job_id, seq, time, kind, payload) VALUES ('', 0, ?, ?, ?)", (now, kind, text)).lastrowid
            db.execute("UPDATE events SET seq = gseq WHERE gseq = ?", (gseq,))
            seq = gseq
        return Event(gseq, job_id, seq, now, kind, payload)

    def events_after(self, job_id: str | None, since: int, limit: int) -> tuple[list[Event], int]:
        """Up to `limit` events after `since` (the job's seq, or the global one without a job),
        and the newest global number at the time of reading."""
        with self._lock:
            if job_id:
                rows = self._db.execute("SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?", (job_id, since, limit))
            else:
                rows = self._db.execute("SELECT * FROM events WHERE gseq > ? ORDER BY gseq LIMIT ?", (since, limit))
            events = [_event(r) for r in rows]
            return events, self.last_gseq()

    def job_events(self, job_id: str, kind: str) -> list[Event]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM events WHERE job_id = ? AND kind = ? ORDER BY seq", (job_id, kind))
            return [_event(r) for r in rows]

    def event(self, job_id: str, seq: int) -> Event | None:
        if seq < 1:  # numbers start at 1 (and seq - 1 must stay inside sqlite's integers)
            return None
        events, _ = self.events_after(job_id, seq - 1, 1)
        return events[0] if events and events[0].seq == seq else None

    def last_gseq(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(gseq), 0) FROM events").fetchone()[0]

    def _get(self, db, job_id: str) -> Job:
        return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


class _Transaction:
    """`BEGIN IMMEDIATE` … `COMMIT` under the store's lock; rolled back on an exception."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self._db, self._lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()


def _job(row: sqlite3.Row) -> Job:
    return Job(
        number=row["number"],
        id=row["id"],
        name=row["name"],
        state=row["state"],
        source=row["source"],
        dataset=row["dataset"],
        inbox_key=row["inbox_key"],
        model=row["model"],
        block_vector=row["block_vector"],
        recipe=None if row["recipe"] is None else json.loads(row["recipe"]),
        created=row["created"],
        started=row["started"],
        ended=row["ended"],
        error=row["error"],
        attempts=row["attempts"],
        progress=None if row["progress"] is None else json.loads(row["progress"]),
        result=json.loads(row["result"]),
        last_seq=row["last_seq"],
    )


def _event(row: sqlite3.Row) -> Event:
    return Event(row["gseq"], row["job_id"], row["seq"], row["time"], row["kind"], json.loads(row["payload"]))
