"""What becomes of a job as its worker reports on it: done, failed, cancelled, held for review,
stopped by the daemon (requeued), or lost with its worker (resumed, up to --max-retries, or failed).

This is the policy apart from the processes: worker slots (daemon/worker_slot.py) own a process and
its pipe and call only `next_run`, `event`, `ended`, `crashed` and `daemon_log`; whatever runs the
worker (a local process today) needs nothing else of the daemon. Every state change goes through
`_lasting`: a full disk delays it, never loses it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

from loradrop.engine.events import Event, Log
from loradrop.engine.jobspec import JobSpec
from loradrop.fsutil import sweep_partials

from .config import DaemonConfig
from .errors import DiskFull
from .events import EventLog
from .home import Home
from .pipe import STOPPED, Done, Run
from .records import CANCELLED, DONE, FAILED, QUEUED, REVIEW, RUNNING, CaptionSettings, Job

log = logging.getLogger(__name__)


class JobPolicy:
    def __init__(self, home: Home, config: DaemonConfig, events: EventLog, wake: Callable[[], None]):
        self.home, self.config, self.events, self._wake = home, config, events, wake
        self.stopping = False
        self.stopped = threading.Event()
        self.hurry = threading.Event()  # a second stop signal: kill what has not stopped yet
        self.cancelling: set[str] = set()

    def reconcile(self) -> None:
        """At start: jobs a dead daemon left running go back to the queue, and what its workers
        half-wrote is swept."""
        for job in self.events.store.jobs([RUNNING]):
            self.events.transition(job.id, QUEUED, expect=(RUNNING,))
            self.events.emit(
                job.id,
                Log(
                    "the daemon stopped while this job ran; it resumes from its last full checkpoint",
                    "warning",
                ),
            )
        self.sweep(self.home.outputs, self.home.cache)

    # ------------------------------------------------------------------ what a slot calls

    def next_run(self, offers: Callable[[str], bool] = lambda pin: True) -> Run | None:
        """The next queued job, claimed (now running), as a worker needs it; None when none waits.
        `offers(pin)`: whether the worker's node has the resource a pinned job names."""
        job = self.events.claim_next(offers)
        return None if job is None else self.run_message(job)

    def run_message(self, job: Job) -> Run:
        spec = JobSpec(
            job_id=job.id,
            name=job.name,
            dataset=Path(job.dataset),
            out_dir=self.home.job_dir(job.id),
            recipe=job.recipe or {},
            model=job.model,
            block_vector=job.block_vector,
            cache_dir=self.home.cache,
            resume=True,
        )  # a job's out_dir is its own: a checkpoint there is from an earlier try
        return Run(spec, str(self.home.inbox), job.captions or CaptionSettings())

    def event(self, job_id: str, body: Event, at: float) -> None:
        self.events.emit(job_id, body, at=at)

    def daemon_log(self, text: str, level: str = "error") -> None:
        self.events.emit("", Log(text, level))

    def ended(self, done: Done) -> None:
        job_id = done.job_id
        self.cancelling.discard(job_id)
        if done.outcome == STOPPED:
            self._requeue(
                job_id,
                "the daemon is stopping; this job resumes from its last full checkpoint on the next start",
            )
            return
        if (
            done.outcome == REVIEW
        ):  # captioned, held for a person: the worker is free for the next job meanwhile
            self._quietly(
                lambda: self.events.emit(
                    job_id,
                    Log(
                        f"captions written; the job waits for review: look them over, then `loradrop accept {job_id}`"
                    ),
                )
            )
            self._lasting(
                lambda: self.events.transition(job_id, REVIEW, expect=(RUNNING,)),
                f"that job {job_id} waits for review",
            )
            return
        if done.outcome == DONE:
            self._lasting(
                lambda: self.events.store.set_result(job_id, done.result), f"the result of job {job_id}"
            )
        state = {DONE: DONE, CANCELLED: CANCELLED}.get(done.outcome, FAILED)
        self._lasting(
            lambda: self.events.transition(job_id, state, error=done.error, expect=(RUNNING,)),
            f"that job {job_id} ended ({state})",
        )

    def crashed(self, job_id: str, reason: str) -> None:
        """The worker running `job_id` died (`reason`: the end of a sentence, "the worker …")."""
        self.sweep(self.home.job_dir(job_id), self.home.cache)
        if self.stopping:
            self._requeue(
                job_id,
                f"the worker {reason}; this job resumes from its last full checkpoint on the next start",
            )
            return
        if job_id in self.cancelling:
            self.cancelling.discard(job_id)
            self._lasting(
                lambda: self.events.transition(
                    job_id, CANCELLED, error=f"the worker {reason} while cancelling", expect=(RUNNING,)
                ),
                f"that job {job_id} was cancelled",
            )
            return
        job = self.events.store.get(job_id)
        if job is not None and job.attempts < self.config.max_retries:
            tries = job.attempts + 1
            self._quietly(
                lambda: self.events.emit(
                    job_id,
                    Log(
                        f"the worker {reason}; resuming from the last full checkpoint (retry {tries} of {self.config.max_retries})",
                        "warning",
                    ),
                )
            )
            self._lasting(
                lambda: self.events.transition(job_id, QUEUED, expect=(RUNNING,), attempts=tries),
                f"that job {job_id} goes back to the queue",
            )
            self._wake()
            return
        self._lasting(
            lambda: self.events.transition(job_id, FAILED, error=f"the worker {reason}", expect=(RUNNING,)),
            f"that job {job_id} failed",
        )

    # ------------------------------------------------------------------ pieces

    def sweep(self, *folders: Path) -> None:
        """Remove the half-written files that killed workers left in `folders` (never listed,
        but they hold disk space); files of writers still running are left alone."""
        for folder in folders:
            removed = sweep_partials(folder)
            if removed:
                log.info("removed %d unfinished files in %s left by stopped workers", len(removed), folder)

    def _requeue(self, job_id: str, why: str) -> None:
        self._quietly(lambda: self.events.emit(job_id, Log(why, "warning")))
        self._lasting(
            lambda: self.events.transition(job_id, QUEUED, expect=(RUNNING,)),
            f"that job {job_id} goes back to the queue",
        )

    def _lasting(self, write: Callable[[], Any], what: str) -> None:
        """A state change must not be lost to a full disk: tried again until the store takes it
        (the store gives sqlite its reserve first, so this waits only once that is spent too)."""
        warned = False
        while True:
            try:
                write()
                return
            except DiskFull as e:
                if not warned:
                    log.error("%s; cannot record %s yet, trying again every 2 s", e, what)
                    warned = True
                if self.hurry.wait(2.0):
                    return  # a second stop signal: the job is found running at the next start, and resumes

    def _quietly(self, write: Callable[[], Any]) -> None:
        """A log line may be lost to a full disk; the daemon says so in its own log."""
        try:
            write()
        except DiskFull as e:
            log.error("%s; an event was not stored", e)
