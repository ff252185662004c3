"""The queue: every job of the daemon with its state, step, loss and ETA, live."""

from __future__ import annotations

import time
from pathlib import PurePosixPath

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header

from loradrop.commands.status import cluster_line
from loradrop.proto.v1 import loradrop_pb2 as pb

from ..facts import job_line
from ..messages import JobUpdated, LinkChanged
from ..widgets.jobs_table import JobsTable
from ..widgets.text_line import TextLine
from .dialogs import Ask


class QueueScreen(Screen):
    BINDINGS = [  # enter (open) is the table's
        Binding("s", "submit", "submit"),
        Binding("c", "cancel", "cancel"),
        Binding("r", "retry", "retry"),
        Binding("b", "blocks", "blocks"),
        Binding("e", "captions", "captions"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield JobsTable(id="jobs")
        yield TextLine(id="job-line")
        yield TextLine(id="daemon-line")
        yield Footer(compact=True)  # every key fits an 80-column terminal

    def on_mount(self) -> None:
        table = self.query_one(JobsTable)
        now = time.monotonic()
        for job in self.app.jobs.values():
            table.upsert(job, self.app.seen_of(job.id), now)
        if self.app.status:
            table.place(self.app.status)
        self._show_daemon()
        self.set_interval(1.0, self._tick)

    def on_job_updated(self, message: JobUpdated) -> None:
        job = message.job
        self.query_one(JobsTable).upsert(job, self.app.seen_of(job.id), time.monotonic())
        if job.id == self.selected:
            self._show_job()
        self._show_daemon()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_job()

    def _show_job(self) -> None:
        job = self.app.jobs.get(self.selected or "")
        line = job_line(job, self.app.seen_of(job.id)) if job else ""
        self.query_one("#job-line", TextLine).say(escape(line))

    def _tick(self) -> None:
        """Once a second: the ETAs count down, the banner says how long the daemon has been away."""
        now = time.monotonic()
        table = self.query_one(JobsTable)
        for job in self.app.jobs.values():
            if job.state == pb.RUNNING:
                table.tick(job, self.app.seen_of(job.id), now)
        if not self.app.connected:
            self._show_daemon()

    def on_link_changed(self, message: LinkChanged) -> None:
        self._show_daemon()

    def status_changed(self, status: pb.StatusReply) -> None:
        self.query_one(JobsTable).place(status)
        self._show_daemon()

    def _show_daemon(self) -> None:
        if self.app.down_since is not None:
            away = time.monotonic() - self.app.down_since
            self.query_one("#daemon-line", TextLine).say(
                f"[b]reconnecting[/] ({away:.0f} s): {escape(self.app.link_detail)}"
            )
            return
        status = self.app.status
        if status is None:
            return
        # on a Ray cluster the cluster stands for its workers: the table says which job runs where
        cluster = f"cluster {cluster_line(status.cluster)}" if status.cluster.address else ""
        if not self.app.jobs:
            line = f"no jobs yet: drop a folder of captioned images into {status.inbox}, or press s"
            line = f"{cluster}  ·  {line}" if cluster else line
        else:
            workers = [f"{w.device} {w.state}" + (f" {w.job_id}" if w.job_id else "") for w in status.workers]
            waiting = (
                f"  ·  waiting in the inbox: {', '.join(status.pending_folders)}"
                if status.pending_folders
                else ""
            )
            where = cluster or f"workers: {'; '.join(workers) or 'none'}"
            line = f"{where}{waiting}  ·  inbox {status.inbox}"
        self.query_one("#daemon-line", TextLine).say(escape(line))

    # ------------------------------------------------------------------ actions

    @property
    def selected(self) -> str | None:
        return self.query_one(JobsTable).selected

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.open(event.row_key.value)  # a click on the row the cursor was on

    def action_open(self) -> None:
        if self.selected:
            self.open(self.selected)

    def open(self, job_id: str) -> None:
        from .job import JobScreen

        self.app.push_screen(JobScreen(job_id))

    def action_submit(self) -> None:
        inbox = self.app.status.inbox if self.app.status else "the inbox"

        def answered(path: str | None) -> None:
            if path:
                self.app.call(self, "submit", lambda c: c.submit(path), self._submitted)

        self.app.push_screen(
            Ask(f"Dataset folder to queue (a folder in {inbox}, or its name):", placeholder="my-dataset"),
            answered,
        )

    def _submitted(self, job: pb.Job) -> None:
        self.app.jobs[job.id] = job
        table = self.query_one(JobsTable)
        table.upsert(job, self.app.seen_of(job.id), time.monotonic())
        table.select(job.id)
        self.notify(f"queued {job.id} ({PurePosixPath(job.dataset).name})")

    def action_cancel(self) -> None:
        if self.selected:
            self.app.cancel_job(self.selected)

    def action_retry(self) -> None:
        if self.selected:
            self.app.retry_job(self.selected)

    def action_blocks(self) -> None:
        from .blocks import BlocksScreen

        job = self.app.jobs.get(self.selected or "")
        lora = job and (job.resized or job.final)
        if not lora:
            self.notify(
                "this job has no LoRA file yet; blocks can be edited once it is done.", severity="warning"
            )
            return
        self.app.push_screen(BlocksScreen(job.id, lora))

    def action_captions(self) -> None:
        from .captions import CaptionScreen

        if self.selected:
            self.app.push_screen(CaptionScreen(self.selected))
