"""Numbered events, stored first and then handed to every stream that waits for them.

The store holds all of them; memory holds only the newest `window`, which serve live streams.
A stream reading older events (a client that reconnects late) reads them from sqlite.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Iterable, Iterator

from loradrop.engine.events import Event as Body

from .records import TERMINAL, Event, Job
from .store import Store

PAGE = 500


class EventLog:
    def __init__(self, store: Store, window: int = 2048, on_end: Callable[[Job], None] | None = None):
        self.store = store
        self._on_end = on_end  # called with a job that has just ended (done, failed, cancelled)
        self._recent: collections.deque[Event] = collections.deque(maxlen=window)
        self._changed = threading.Condition()
        self._top = store.last_gseq()

    def emit(self, job_id: str, body: Body, at: float | None = None) -> Event:
        """Store and publish an event; `at` is when it happened (default: now)."""
        # The store insert and the publication happen under one lock, so memory keeps
        # the events in the store's order.
        with self._changed:
            return self._publish(self.store.add_event(job_id, body, at))

    def add_job(self, **fields) -> Job:
        with self._changed:
            job, event = self.store.add_job(**fields)
            self._publish(event)
        return self._announce_end(job)

    def claim_next(self, accept: Callable[[str], bool] = lambda pin: True) -> Job | None:
        """The next queued job `accept` takes (by its pin; see Store.claim_next), now running."""
        with self._changed:
            claimed = self.store.claim_next(accept)
            return self._publish_change(claimed)

    def transition(
        self, job_id: str, state: str, *, error: str = "", expect: Iterable[str], attempts: int | None = None
    ) -> Job | None:
        """Change a job's state (if it is in `expect`) and announce it; None if it was not."""
        with self._changed:
            job = self._publish_change(
                self.store.transition(job_id, state, error=error, expect=expect, attempts=attempts)
            )
        return self._announce_end(job)

    def accept_captions(self, job_id: str) -> Job | None:
        """A job in review queued again, its captions accepted, and announced; None if it was not in review."""
        with self._changed:
            return self._publish_change(self.store.accept_captions(job_id))

    def _announce_end(self, job: Job | None) -> Job | None:
        # outside the lock: the callback may take its time
        if job is not None and job.state in TERMINAL and self._on_end is not None:
            self._on_end(job)
        return job

    def _publish_change(self, changed: tuple[Job, Event] | None) -> Job | None:
        if changed is None:
            return None
        job, event = changed
        self._publish(event)
        return job

    def _publish(self, event: Event) -> Event:
        self._recent.append(event)
        self._top = event.gseq
        self._changed.notify_all()
        return event

    @property
    def top(self) -> int:
        return self._top

    def follow(
        self, job_id: str | None, since: int, *, follow: bool, stopped: Callable[[], bool]
    ) -> Iterator[Event]:
        """Events after `since` (the job's seq, or the global one without a job), in order, each
        once; with `follow`, new ones as they come, until `stopped()` or the job has ended."""
        cursor, seen = since, (0 if job_id else since)  # seen: every global number up to it was looked at
        while not stopped():
            ended = bool(job_id) and self._ended(
                job_id
            )  # read before the batch: its last event is then in it
            batch, seen = self._after(job_id, cursor, seen)
            for event in batch:
                yield event
                cursor = _key(event, job_id)
            if batch:
                continue
            if not follow or ended:
                return
            with self._changed:
                self._changed.wait_for(lambda: self._top > seen, timeout=0.5)

    def _after(self, job_id: str | None, cursor: int, seen: int) -> tuple[list[Event], int]:
        with self._changed:
            recent = self._recent
            if recent and recent[0].gseq <= seen + 1:
                batch = [
                    e
                    for e in recent
                    if e.gseq > seen and _key(e, job_id) > cursor and (not job_id or e.job_id == job_id)
                ]
                return batch, recent[-1].gseq
        batch, top = self.store.events_after(job_id, cursor, PAGE)
        return batch, (batch[-1].gseq if len(batch) == PAGE else top)

    def _ended(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is None or job.state in TERMINAL


def _key(event: Event, job_id: str | None) -> int:
    return event.seq if job_id else event.gseq
