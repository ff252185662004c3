"""The job store: which job runs next (pinned jobs too), and a database from before a column was added."""

from __future__ import annotations

import sqlite3

from loradrop.daemon.records import CANCELLED, FAILED, QUEUED, RUNNING
from loradrop.daemon.store import Store


def _add(store: Store, name: str, pin: str = "") -> str:
    job, _ = store.add_job(
        name=name,
        source="submit",
        dataset=f"/x/{name}",
        inbox_key=None,
        model=None,
        block_vector=None,
        recipe={},
        pin=pin,
    )
    return job.id


def _not_big(pin: str) -> bool:  # a worker on a node without the "big" label
    return pin != "big"


def _big(pin: str) -> bool:  # a worker on the node labelled "big"
    return pin == "big"


def test_an_interrupted_job_runs_before_older_queued_ones(tmp_path):
    """After a kill -9 and a restart, the job that had been running at step 6 lost its place to a
    job retried meanwhile (an older one, so first by number)."""
    store = Store(tmp_path / "state.sqlite")
    old, running, new = _add(store, "old"), _add(store, "running"), _add(store, "new")
    store.transition(old, CANCELLED, expect=(QUEUED,))
    assert store.claim_next()[0].id == running
    store.transition(running, QUEUED, expect=(RUNNING,))  # the daemon died while it ran
    store.transition(old, QUEUED, expect=(CANCELLED,), attempts=0)  # retried while the worker started
    assert [store.claim_next()[0].id for _ in range(3)] == [running, old, new]
    # once it ends, and is retried, it is a queued job like any other
    store.transition(running, FAILED, expect=(RUNNING,))
    store.transition(running, QUEUED, expect=(FAILED,), attempts=0)
    assert store.get(running).state == QUEUED
    store.close()


def test_a_database_from_before_interruptions_were_kept_opens(tmp_path):
    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (number INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, state TEXT NOT NULL,
            source TEXT NOT NULL, dataset TEXT NOT NULL, inbox_key TEXT, model TEXT, block_vector TEXT, recipe TEXT,
            created REAL NOT NULL, started REAL, ended REAL, error TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0,
            progress TEXT, result TEXT NOT NULL DEFAULT '{}', last_seq INTEGER NOT NULL DEFAULT 0);
        INSERT INTO jobs (number, id, name, state, source, dataset, created) VALUES (1, '0001-a', 'a', 'queued', 'submit', '/x/a', 0);
    """)
    db.close()
    store = Store(path)
    assert store.claim_next()[0].id == "0001-a"
    store.close()


def test_a_pinned_job_waits_for_a_worker_on_a_node_that_offers_its_pin(tmp_path):
    store = Store(tmp_path / "state.sqlite")
    pinned, free = _add(store, "pinned", pin="big"), _add(store, "free")
    assert store.get(pinned).pin == "big" and store.get(free).pin == ""
    assert store.claim_next(_not_big)[0].id == free  # the older job is skipped, not in the way
    assert store.claim_next(_not_big) is None  # and it waits for a worker that can take it
    assert store.get(pinned).state == QUEUED
    assert store.claim_next(_big)[0].id == pinned
    store.close()


def test_a_worker_that_offers_the_pin_takes_the_older_pinned_job_first(tmp_path):
    store = Store(tmp_path / "state.sqlite")
    pinned, free = _add(store, "pinned", pin="big"), _add(store, "free")
    assert [store.claim_next(_big)[0].id for _ in range(2)] == [pinned, free]
    store.close()


def test_an_interrupted_pinned_job_does_not_hold_up_the_others(tmp_path):
    store = Store(tmp_path / "state.sqlite")
    old, pinned, new = _add(store, "old"), _add(store, "pinned", pin="big"), _add(store, "new")
    store.transition(old, CANCELLED, expect=(QUEUED,))
    assert store.claim_next(_big)[0].id == pinned
    store.transition(pinned, QUEUED, expect=(RUNNING,))  # its node was lost: interrupted, first in line
    store.transition(old, QUEUED, expect=(CANCELLED,), attempts=0)
    assert [store.claim_next(_not_big)[0].id for _ in range(2)] == [old, new]
    assert store.claim_next(_not_big) is None
    assert store.claim_next(_big)[0].id == pinned
    store.close()


def test_a_database_from_before_pins_opens_and_its_jobs_run_anywhere(tmp_path):
    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (number INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, state TEXT NOT NULL,
            source TEXT NOT NULL, dataset TEXT NOT NULL, inbox_key TEXT, model TEXT, block_vector TEXT, recipe TEXT,
            created REAL NOT NULL, started REAL, ended REAL, error TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0,
            progress TEXT, result TEXT NOT NULL DEFAULT '{}', last_seq INTEGER NOT NULL DEFAULT 0,
            interrupted INTEGER NOT NULL DEFAULT 0, captions TEXT);
        INSERT INTO jobs (number, id, name, state, source, dataset, created) VALUES (1, '0001-a', 'a', 'queued', 'submit', '/x/a', 0);
    """)
    db.close()
    store = Store(path)
    assert store.get("0001-a").pin == ""
    assert store.claim_next(lambda pin: False)[0].id == "0001-a"  # unpinned: any worker takes it
    assert store.get(_add(store, "b", pin="big")).pin == "big"  # the new column holds new pins
    store.close()
