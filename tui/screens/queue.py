"""The queue: every job of the daemon with its state, step, loss and ETA, live."""

from __future__ import annotations

from pathlib import PurePosixPath

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from loradrop.proto.v1 import loradrop_pb2 as pb

from ..messages import JobUpdated, LinkChanged
from ..widgets.jobs_table import JobsTable
from .dialogs import Ask


class QueueScreen(Screen):
    BINDINGS = [
        Binding("enter", "open", "open", priority=True),
        Binding("s", "submit", "submit"),
        Binding("c", "cancel", "cancel"),
        Binding("r", "retry", "retry"),
        Binding("b", "blocks", "blocks"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield JobsTable(id="jobs")
        yield Static("", id="daemon-line")
        yield Footer(compact=True)  # every key fits an 80-column terminal

    def on_mount(self) -> None:
        table = self.query_one(JobsTable)
        for job in self.app.jobs.values():
            table.upsert(job)
        self._show_daemon()

    def on_job_updated(self, message: JobUpdated) -> None:
        self.query_one(JobsTable).upsert(message.job)
        self._show_daemon()

    def on_link_changed(self, message: LinkChanged) -> None:
        if not message.up:
            self.query_one("#daemon-line", Static).update(f"[b red]reconnecting[/]: {message.detail}")

    def status_changed(self, status: pb.StatusReply) -> None:
        self._show_daemon()

    def _show_daemon(self) -> None:
        status = self.app.status
        if status is None:
            return
        if not self.app.jobs:
            line = f"no jobs yet: drop a folder of captioned images into {status.inbox}, or press s"
        else:
            workers = [f"{w.device} {w.state}" + (f" {w.job_id}" if w.job_id else "") for w in status.workers]
            waiting = f"  ·  waiting in the inbox: {', '.join(status.pending_folders)}" if status.pending_folders else ""
            line = f"workers: {'; '.join(workers) or 'none'}{waiting}  ·  inbox {status.inbox}"
        self.query_one("#daemon-line", Static).update(line)

    # ------------------------------------------------------------------ actions

    @property
    def selected(self) -> str | None:
        return self.query_one(JobsTable).selected

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        from .job import JobScreen

        if self.selected:
            self.app.push_screen(JobScreen(self.selected))

    def action_submit(self) -> None:
        inbox = self.app.status.inbox if self.app.status else "the inbox"

        def answered(path: str | None) -> None:
            if path:
                self.app.call(self, "submit", lambda c: c.submit(path), self._submitted)

        self.app.push_screen(Ask(f"Dataset folder to queue (a folder in {inbox}, or its name):", placeholder="my-dataset"), answered)

    def _submitted(self, job: pb.Job) -> None:
        self.app.jobs[job.id] = job
        table = self.query_one(JobsTable)
        table.upsert(job)
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
            self.notify("this job has no LoRA file yet; blocks can be edited once it is done.", severity="warning")
            return
        self.app.push_screen(BlocksScreen(job.id, lora))
