"""Numbered events: every stream sees every event once, in order, whether it reads them live,
from memory or (when it lags behind the window) from sqlite, and across reconnects."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from loradrop.daemon.events import EventLog
from loradrop.daemon.records import DONE, QUEUED, RUNNING
from loradrop.daemon.store import Store
from loradrop.engine.events import Log, Progress, StateChange
from loradrop.proto.client import ClientError
from loradrop.testing import make_dataset, wait_for

pytestmark = pytest.mark.timeout(120)


def _log(tmp_path, window: int) -> EventLog:
    return EventLog(Store(tmp_path / "state.sqlite"), window=window)


def _job(events: EventLog, name: str) -> str:
    return events.add_job(
        name=name,
        source="submit",
        dataset=f"/x/{name}",
        inbox_key=None,
        model=None,
        block_vector=None,
        recipe={},
    ).id


def test_streams_read_in_order_from_memory_and_from_sqlite(tmp_path):
    events = _log(tmp_path, window=16)
    jobs = [_job(events, n) for n in ("a", "b", "c")]
    for i in range(120):
        events.emit(jobs[i % 3], Log(str(i)))
    everything = list(events.follow(None, 0, follow=False, stopped=lambda: False))
    assert [e.gseq for e in everything] == list(range(1, 124))
    b = list(events.follow(jobs[1], 0, follow=False, stopped=lambda: False))
    assert [e.seq for e in b] == list(range(1, 42))  # its state event, then 40 lines
    assert [e.body.text for e in b[1:]] == [str(i) for i in range(1, 120, 3)]
    later = list(events.follow(jobs[1], 30, follow=False, stopped=lambda: False))
    assert [e.seq for e in later] == list(range(31, 42))
    recent = list(events.follow(None, 118, follow=False, stopped=lambda: False))  # inside the window
    assert [e.gseq for e in recent] == list(range(119, 124))


def test_a_followed_job_stream_ends_with_the_jobs_last_state(tmp_path):
    events = _log(tmp_path, window=8)
    job = _job(events, "a")
    seen = []

    def follow():
        seen.extend(events.follow(job, 0, follow=True, stopped=lambda: False))

    reader = threading.Thread(target=follow)
    reader.start()
    assert events.claim_next().id == job
    for i in range(20):
        events.emit(job, Progress("train", i, 20))
    events.transition(job, DONE, expect=(RUNNING,))
    reader.join(10)
    assert not reader.is_alive()
    assert [e.seq for e in seen] == list(range(1, 24))
    assert seen[-1].kind == "state" and seen[-1].body.state == DONE
    assert events.store.get(job).progress.done == 19


def test_twenty_concurrent_followers_each_see_every_event_once_in_order(tmp_path):
    events = _log(tmp_path, window=32)  # small: slow readers fall back to sqlite
    job = _job(events, "a")
    total = 1 + 2000
    results: list[list[int]] = [[] for _ in range(20)]
    stop = threading.Event()

    def follow(out: list[int], delay: float):
        for e in events.follow(None, 0, follow=True, stopped=stop.is_set):
            out.append(e.gseq)
            if delay:
                time.sleep(delay)
            if len(out) == total:
                return

    readers = [threading.Thread(target=follow, args=(results[i], 0.0005 * (i % 3))) for i in range(20)]
    for r in readers:
        r.start()
    for i in range(2000):
        events.emit(job, Log(str(i)))
    for r in readers:
        r.join(60)
    stop.set()
    for out in results:
        assert out == list(range(1, total + 1))


def test_a_state_change_and_its_event_are_one(tmp_path):
    events = _log(tmp_path, window=8)
    job = _job(events, "a")
    assert events.transition(job, DONE, expect=(RUNNING,)) is None  # not running: nothing happens
    assert [e.kind for e in events.follow(job, 0, follow=False, stopped=lambda: False)] == ["state"]
    assert events.transition(job, "cancelled", expect=(QUEUED,)).state == "cancelled"
    last = list(events.follow(job, 0, follow=False, stopped=lambda: False))[-1]
    assert last.body == StateChange("cancelled", "")


# ---------------------------------------------------------------------------- over a real daemon


def test_twenty_clients_streaming_at_once_each_see_every_event_in_order(home, daemons):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    make_dataset(home / "inbox" / "cats")
    n_jobs = 30
    results: list[list[tuple[int, str]]] = [[] for _ in range(20)]

    def stream(out):
        with d.client() as c:
            for e in c.events(follow=True):
                out.append((e.global_seq, e.job_id))
                if len(out) == 2 * n_jobs:
                    return

    readers = [threading.Thread(target=stream, args=(out,)) for out in results]
    for r in readers:
        r.start()
    with d.client() as c:
        for i in range(n_jobs):  # each job: queued, then cancelled — two events
            job = c.submit("cats", name=f"j{i}")
            c.cancel(job.id)
    for r in readers:
        r.join(60)
    expected = results[0]
    assert [g for g, _ in expected] == list(range(1, 2 * n_jobs + 1))
    for out in results:
        assert out == expected


def test_a_client_reconnecting_with_since_misses_none_even_across_a_restart(home, daemons):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    make_dataset(home / "inbox" / "cats")
    with d.client() as c:
        first = c.submit("cats", name="a")
        seen = [e.global_seq for e in c.events(follow=False)]
        assert seen == [1]
        for name in "bcd":
            c.submit("cats", name=name)
        assert [e.global_seq for e in c.events(since=seen[-1], follow=False)] == [2, 3, 4]
        assert [e.seq for e in c.events(first.id, since=0, follow=False)] == [1]

    got: list[int] = []
    follower_client = d.client()

    def follow():
        for event in follower_client.events(since=4):
            got.append(event.global_seq)
            if len(got) == 6:
                return

    follower = threading.Thread(target=follow)
    follower.start()
    with d.client() as c:
        c.submit("cats", name="e")
        wait_for(lambda: len(got) == 1, what="the live event")
    assert d.stop() == 0  # the stream breaks; the client waits for the daemon to come back
    d.start()
    with d.client() as c:
        for name in "fghij":
            c.submit("cats", name=name)
    follower.join(60)
    follower_client.close()
    assert got == [5, 6, 7, 8, 9, 10]


def test_a_stream_can_ask_for_some_kinds_only(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "0.3")
    make_dataset(home / "inbox" / "cats")  # queued: a state event
    sneaky = make_dataset(tmp_path / "sneaky")
    (sneaky / "extra.txt").symlink_to("/etc/hostname")
    sneaky.rename(home / "inbox" / "sneaky")  # refused: a state event and a warning
    with d.client() as c:
        wait_for(lambda: len(c.jobs()) == 2, what="both folders to be judged")
        everything = list(c.events(follow=False))
        states = list(c.events(follow=False, kinds=["state"]))
        logs = list(c.events(follow=False, kinds=["log", "no_such_kind"]))
        assert {e.kind for e in everything} >= {"state", "log"}
        assert [e.global_seq for e in states] == [e.global_seq for e in everything if e.kind == "state"]
        assert [e.global_seq for e in logs] == [e.global_seq for e in everything if e.kind == "log"]
        with pytest.raises(ClientError) as bad:
            list(c.events(follow=False, reconnect=False, kinds=["Log; DROP TABLE"]))
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "kinds" in str(bad.value)
