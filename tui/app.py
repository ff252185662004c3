"""The loradrop TUI: attaches to a daemon over gRPC and shows its queue, a job, a LoRA's blocks.

The app owns the connection: one client for calls (`call`), one followed stream of every event
of the daemon that keeps the queue live (`JobUpdated` to every screen), and a small cache of
sample images. Screens open their own streams (a job's log) with `EventFeed`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable, TypeVar

from textual.binding import Binding
from textual.dom import DOMNode
from textual.worker import Worker, get_current_worker

from loradrop.proto.client import Client, ClientError
from loradrop.proto.v1 import loradrop_pb2 as pb

from .facts import Seen
from .images import Picture, Pictures
from .keys import KeysInOrder
from .link import EventFeed, Link, Target
from .messages import EventBatch, EventsArrived, JobUpdated, LinkChanged, PreviewProgressed
from .screens.dialogs import Confirm
from .screens.queue import QueueScreen
from .terminal_gone import exit_when_terminal_gone

T = TypeVar("T")
IMAGE_CACHE = 96  # sample PNGs kept (each a few to a few hundred kB)
QUEUE_KINDS = ("state", "stage", "progress", "preview")  # what the app follows of every job
STATUS_EVERY = 3.0  # seconds between daemon status refreshes (workers, inbox folders)


class LoradropApp(KeysInOrder):
    CSS_PATH = Path(__file__).with_name("loradrop.tcss")
    TITLE = "loradrop"
    ENABLE_COMMAND_PALETTE = False  # its key and footer entry would crowd an 80-column footer
    BINDINGS = [Binding("q", "quit", "quit")]

    def __init__(self, target: Target, pictures: Pictures, *, retry_delay: float = 0.2):
        super().__init__()
        self.target = target
        self.link = Link(target)
        self.pictures = pictures
        self.retry_delay = retry_delay
        self.jobs: dict[str, pb.Job] = {}
        self.seen: dict[str, Seen] = {}  # what each job's events said beyond its pb.Job (tui/facts.py)
        self.status: pb.StatusReply | None = None
        self.connected = False
        self.down_since: float | None = None  # time.monotonic() when the daemon stopped answering
        self.link_detail = ""  # why, as the last try said: the banner shows the latest, not the first
        self._was_connected = False
        self._feeds: list[EventFeed] = []
        self._images: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._waiting: dict[tuple[str, int], list[tuple[DOMNode, Callable[[bytes], None] | None]]] = {}
        self._stop = threading.Event()
        self.sub_title = f"connecting to {self.link.address} …"

    def on_mount(self) -> None:
        self.push_screen(QueueScreen())
        self.run_worker(self._connect, thread=True, name="connect")
        self.set_interval(STATUS_EVERY, self._poll_status)
        if not self.is_headless:  # a real terminal, which may go away without a SIGHUP
            exit_when_terminal_gone(self)

    def on_resize(self) -> None:
        """The terminal changed size; the screen lays itself out again a timer tick later, and
        sixel pictures drawn while it does come out wrong: they wait (`Picture.hold`)."""
        for picture in self.screen.query(Picture):
            picture.hold()

    def on_unmount(self) -> None:
        self._stop.set()
        for feed in self._feeds:
            feed.stop()
        self.link.close()

    # ------------------------------------------------------------------ the connection

    def _connect(self) -> None:
        """Wait for the daemon, load the queue, then follow every event after that moment."""
        delay = self.retry_delay
        while not self._stop.is_set():
            try:
                status = self.link.client.status()
                jobs = self.link.client.jobs()
                break
            except ClientError as e:
                self.call_from_thread(self._set_link, False, str(e))
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
                self.link.renew()
        else:
            return
        self.call_from_thread(self._loaded, status, jobs)
        # The queue needs states, stages and progress (the blocks screen its previews' progress)
        # only: a job logging a thousand lines a second should cost the screens that do not show
        # its log nothing.
        self.run_feed(self.open_feed("", status.last_event_seq, kinds=QUEUE_KINDS), self)

    def open_feed(self, job_id: str, since: int, kinds: tuple[str, ...] = ()) -> EventFeed:
        """A followed stream of a job's events (every job's with `job_id=""`; only `kinds` when
        given), stopped when the app ends; start it with `run_feed` in a thread."""
        feed = EventFeed(self.target, job_id, since, kinds=kinds, retry_delay=self.retry_delay)
        self._feeds.append(feed)
        if self._stop.is_set():  # the app ended meanwhile: a feed opened now must not outlive it
            feed.stop()
        return feed

    def close_feed(self, feed: EventFeed) -> None:
        feed.stop()
        if feed in self._feeds:
            self._feeds.remove(feed)

    def run_feed(self, feed: EventFeed, node: DOMNode) -> None:
        """Run `feed` in this thread, handing its events to `node` as `EventsArrived` batches."""
        batch = EventBatch(node.post_message)
        feed.run(batch.put, lambda up, detail: node.post_message(LinkChanged(up, detail)))

    def _loaded(self, status: pb.StatusReply, jobs: list[pb.Job]) -> None:
        self._set_link(True, "")
        now = time.monotonic()
        untold = []  # jobs whose pb.Job does not say their stage or final loss: their events will
        for job in jobs:
            seen = self.seen_of(job.id)
            if job.HasField("progress") and seen.progress_at is None:
                seen.progress_at = now  # its age is unknown: the ETA counts down from now
            if job.state == pb.RUNNING or (job.state == pb.DONE and seen.train is None):
                untold.append(job.id)
            self._update(job)
        self._set_status(status)
        if untold:
            self.run_worker(partial(self._recall, untold), thread=True, group="recall", exit_on_error=False)

    def seen_of(self, job_id: str) -> Seen:
        return self.seen.setdefault(job_id, Seen())

    def _recall(self, job_ids: list[str]) -> None:
        """Read the stage and last training progress of jobs that ran before the app started."""
        for job_id in job_ids:
            recalled = Seen()
            try:
                for event in self.link.client.events(
                    job_id, follow=False, reconnect=False, kinds=("stage", "progress")
                ):
                    recalled.learn(event, 0.0, 0.0)
            except ClientError:
                continue  # gone, or the daemon is away: the queue shows less, nothing wrong
            if self._stop.is_set():
                return
            self.call_from_thread(self._recalled, job_id, recalled)

    def _recalled(self, job_id: str, recalled: Seen) -> None:
        seen = self.seen_of(job_id)
        # Events the live feed delivered meanwhile are newer than these: keep what they said.
        seen.stage = seen.stage or recalled.stage
        seen.train = seen.train or recalled.train
        if job_id in self.jobs:
            self._broadcast(self.jobs[job_id])

    def _set_link(self, up: bool, detail: str) -> None:
        if not up and self.down_since is None:
            self.down_since = time.monotonic()
        self.connected = up
        self._was_connected |= up
        self.link_detail = detail
        if up:
            self.down_since = None
            self.sub_title = f"{self.link.address} · connected"
        else:
            self.sub_title = f"{'reconnecting' if self._was_connected else 'waiting for the daemon'} at {self.link.address} …"
        for screen in self.screen_stack:
            screen.post_message(LinkChanged(up, detail))

    def on_link_changed(self, message: LinkChanged) -> None:
        if message.up:
            self.link.renew()  # the old channel may sit in its reconnect back-off
            self.call(self, "jobs", lambda c: (c.status(), c.jobs()), lambda got: self._loaded(*got))
        else:
            self._set_link(False, message.detail)

    def on_events_arrived(self, message: EventsArrived) -> None:
        changed, refresh = {}, set()
        now, wall = time.monotonic(), time.time()
        for event in message.batch.take():
            job = self.jobs.get(event.job_id)
            if not event.job_id:
                continue  # the daemon's own events
            if event.HasField("preview"):  # the blocks screen that asked for it shows how far it is
                for screen in self.screen_stack:
                    screen.post_message(PreviewProgressed(event.preview))
                continue
            self.seen_of(event.job_id).learn(event, now, wall)
            if job is None or event.HasField("state"):
                refresh.add(event.job_id)  # a new job, or a new state: its other fields changed too
                if job is None:
                    continue
                job.state = event.state.state
            elif event.HasField("progress"):
                job.progress.CopyFrom(event.progress)
            elif not event.HasField("stage"):
                continue
            changed[job.id] = job
        for job in changed.values():  # once per batch: a resize reports hundreds of steps at once
            self._broadcast(job)
        for job_id in refresh:
            self.call(self, "job", partial(_get_job, job_id), self._update, quiet=True)

    def _update(self, job: pb.Job) -> None:
        self.jobs[job.id] = job
        self._broadcast(job)

    def _broadcast(self, job: pb.Job) -> None:
        for screen in self.screen_stack:
            screen.post_message(JobUpdated(job))

    def _poll_status(self) -> None:
        # While the daemon is away this says why as of now ("it is stopping" turns into "no such
        # socket" once it has exited); the streams themselves notice when it is back.
        failed = None if self.connected else (lambda e: self._set_link(False, str(e)))
        self.call(self, "status", lambda c: c.status(), self._set_status, quiet=True, failed=failed)

    def _set_status(self, status: pb.StatusReply) -> None:
        self.status = status
        for screen in self.screen_stack:
            refresh = getattr(screen, "status_changed", None)
            if refresh:
                refresh(status)

    # ------------------------------------------------------------------ calls

    def call(
        self,
        node: DOMNode,
        what: str,
        fn: Callable[[Client], T],
        done: Callable[[T], None] | None = None,
        *,
        failed: Callable[[ClientError], None] | None = None,
        quiet: bool = False,
    ) -> Worker:
        """Run `fn(client)` in a thread; `done(result)` then runs in the UI, unless `node` has
        gone meanwhile. A refusal goes to `failed`, and becomes a notification unless `quiet`."""

        def work() -> None:
            worker = get_current_worker()
            try:
                result = fn(self.link.client)
            except ClientError as e:
                if worker.is_cancelled or self._stop.is_set():
                    return
                if failed is not None:
                    self.call_from_thread(failed, e)
                if not quiet:
                    self.call_from_thread(self.notify, str(e), title=what, severity="error", timeout=8)
                return
            if done is not None and not worker.is_cancelled and not self._stop.is_set():
                self.call_from_thread(_if_attached, node, done, result)

        return node.run_worker(work, thread=True, group=what, exit_on_error=False)

    def fetch_sample(self, node: DOMNode, path: str, size: int, done: Callable[[bytes], None] | None) -> None:
        """A sample's PNG at `size` pixels (longest side), from the cache or the daemon."""
        key = (path, size)
        if key in self._images:
            self._images.move_to_end(key)
            if done is not None:
                done(self._images[key])
            return
        waiting = self._waiting.setdefault(key, [])
        waiting.append((node, done))
        if len(waiting) == 1:
            self.call(
                node,
                "sample",
                lambda c: c.sample(path, max_size=size).png,
                partial(self._fetched, key),
                failed=lambda e: self._waiting.pop(key, None),
            )

    def _fetched(self, key: tuple[str, int], png: bytes) -> None:
        self._images[key] = png
        while len(self._images) > IMAGE_CACHE:
            self._images.popitem(last=False)
        for node, done in self._waiting.pop(key, []):
            if done is not None:
                _if_attached(node, done, png)

    # ------------------------------------------------------------------ actions shared by screens

    def cancel_job(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state not in (pb.QUEUED, pb.RUNNING, pb.REVIEW):
            self.notify(
                f"job {job_id} is not queued or running; there is nothing to cancel.", severity="warning"
            )
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.call(self, "cancel", lambda c: c.cancel(job_id), self._update)

        self.push_screen(
            Confirm(
                f"Cancel job {job_id}? A running job stops at the next step; its checkpoints stay.",
                yes="Cancel job",
            ),
            answered,
        )

    def retry_job(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state not in (pb.FAILED, pb.CANCELLED):
            self.notify(
                f"job {job_id} has not failed or been cancelled; only those can be retried.",
                severity="warning",
            )
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.call(self, "retry", lambda c: c.retry(job_id), self._update)

        self.push_screen(
            Confirm(f"Retry job {job_id}? It continues from its last full checkpoint.", yes="Retry"), answered
        )


def _get_job(job_id: str, client: Client) -> pb.Job:
    return client.job(job_id)


def _if_attached(node: DOMNode, fn: Callable[[T], None], value: T) -> None:
    if node is node.app or getattr(node, "is_attached", False):
        fn(value)
