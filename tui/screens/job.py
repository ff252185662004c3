"""One job: its log as it streams, progress, loss, the samples gallery and montage, its files."""

from __future__ import annotations

import time
from functools import partial

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static, TabbedContent, TabPane

from loradrop.commands.logs import event_line
from loradrop.proto.client import TERMINAL
from loradrop.proto.v1 import loradrop_pb2 as pb

from ..facts import title_parts
from ..formatting import size_text
from ..link import EventFeed
from ..messages import EventsArrived, JobUpdated
from ..samples import SampleIndex
from ..widgets.artifacts import ArtifactsTable
from ..widgets.gallery import Gallery
from ..widgets.loss_plot import LossPlot
from ..widgets.stream_log import Line, StreamLog
from ..widgets.text_line import TextLine

MAX_LOG_LINES = 5000  # older lines scroll away; the daemon keeps them all (`loradrop logs`)
LORA_KINDS = {"final", "resized", "chopped", "step"}


class JobScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        # The tabs' own labels name these keys, which leaves the footer room at 80 columns.
        Binding("l", "tab('log')", "log", show=False),
        Binding("g", "tab('samples')", "samples", show=False),
        Binding("a", "tab('artifacts')", "files", show=False),
        Binding("b", "blocks", "blocks"),
        Binding("c", "cancel", "cancel"),
        Binding("r", "retry", "retry"),
    ]

    def __init__(self, job_id: str):
        super().__init__()
        self.job_id = job_id
        self.samples = SampleIndex()
        self.feed: EventFeed | None = None
        self._feed_worker = None
        self.last_seq = 0
        self._artifacts_due = False

    @property
    def job(self) -> pb.Job | None:
        return self.app.jobs.get(self.job_id)

    def compose(self) -> ComposeResult:
        yield Header()
        yield TextLine(self.job_id, id="job-title")
        yield ProgressBar(
            total=1, show_eta=False, id="job-progress"
        )  # a total from the start: no busy animation
        yield LossPlot(id="loss")
        with TabbedContent(initial="log", id="job-tabs"):
            with TabPane("log [b]l[/]", id="log"):
                yield StreamLog(max_lines=MAX_LOG_LINES, id="job-log")
            with TabPane("samples [b]g[/]", id="samples"):
                yield Gallery(self.samples, self.app.pictures, id="gallery")
            with TabPane("files [b]a[/]", id="artifacts"):
                yield ArtifactsTable(id="artifacts-table")
                yield Static("", id="artifact-path")
        yield Footer(compact=True)  # every key fits an 80-column terminal

    def on_mount(self) -> None:
        self._show_job()
        self._start_feed()
        self.load_artifacts()
        self.set_interval(1.0, self._tick)
        self.query_one("#job-log", StreamLog).focus()

    def on_unmount(self) -> None:
        if self.feed is not None:
            self.app.close_feed(self.feed)

    def _start_feed(self) -> None:
        """Follow the job's events after the last one seen (all of them the first time)."""
        if self.feed is not None:
            self.app.close_feed(self.feed)
        self.feed = self.app.open_feed(self.job_id, self.last_seq)
        self._feed_worker = self.run_worker(
            partial(self.app.run_feed, self.feed, self), thread=True, exit_on_error=False
        )

    # ------------------------------------------------------------------ events

    def on_events_arrived(self, message: EventsArrived) -> None:
        lines, samples, progress = [], False, None
        plot = self.query_one(LossPlot)
        seen = self.app.seen_of(self.job_id)
        now, wall = time.monotonic(), time.time()
        for event in message.batch.take():
            self.last_seq = event.seq  # the feed hands each event once, in order
            seen.learn(event, now, wall)
            body = event.WhichOneof("body")
            if body == "progress":
                progress = event.progress
                if progress.stage == "train" and progress.HasField("loss"):
                    plot.add(progress.done, progress.loss)
                continue
            if body == "preview":
                continue  # a preview's steps: the blocks screen that asked for it shows them
            if body == "sample":
                samples = self.samples.add(event) is not None or samples
            elif body in ("artifact", "state"):
                self._artifacts_due = True
            lines.append(Line(event_line(event), _level(event)))
        if progress is not None:  # the bar and the title show the latest only
            self._progress(progress)
        elif lines:
            self._show_job()  # a new stage, say
        if lines:
            self.query_one("#job-log", StreamLog).add(lines)
        if samples:
            self.query_one(Gallery).samples_changed()

    def _progress(self, p: pb.Progress) -> None:
        self.query_one("#job-progress", ProgressBar).update(total=max(p.total, 1), progress=p.done)
        job = self.job
        if job is not None:
            job.progress.CopyFrom(p)
            self._show_job()

    def on_job_updated(self, message: JobUpdated) -> None:
        if message.job.id != self.job_id:
            return
        self._show_job()
        # A retried job streams again: its feed ended with the job, so open a new one.
        if (
            message.job.state not in TERMINAL
            and self._feed_worker is not None
            and self._feed_worker.is_finished
        ):
            self._start_feed()

    def _show_job(self) -> None:
        job = self.job
        if job is None:
            self.app.call(self, "job", lambda c: c.job(self.job_id), self._got_job)
            return
        parts = title_parts(job, self.app.seen_of(job.id), time.monotonic())
        self.query_one("#job-title", TextLine).say("  ·  ".join(parts))

    def _got_job(self, job: pb.Job) -> None:
        self.app.jobs[job.id] = job
        self._show_job()

    # ------------------------------------------------------------------ files

    def load_artifacts(self) -> None:
        self._artifacts_due = False
        self.app.call(
            self, "files", lambda c: c.artifacts(self.job_id), self.query_one(ArtifactsTable).load, quiet=True
        )

    def _tick(self) -> None:
        """Once a second: the ETA counts down; the files are listed again when an event named one."""
        if self.job is not None and self.job.state == pb.RUNNING:
            self._show_job()
        if self._artifacts_due:
            self.load_artifacts()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "artifacts-table":
            a = self.query_one(ArtifactsTable).selected
            self.query_one("#artifact-path", Static).update(
                escape(f"{a.path}  ({size_text(a.bytes)})") if a else ""
            )

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id != "artifacts-table":
            return
        a = self.query_one(ArtifactsTable).selected
        if a is not None and _is_lora(a):
            self.action_blocks()
        else:
            self.notify(
                "enter opens the blocks of a LoRA file (.safetensors); this is not one.", severity="warning"
            )

    # ------------------------------------------------------------------ actions

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        focus = {"log": "#job-log", "samples": "#gallery", "artifacts": "#artifacts-table"}[tab]
        self.query_one(focus).focus()
        if tab == "samples":
            self.call_after_refresh(self.query_one(Gallery).show)  # once the tab has its size

    def action_blocks(self) -> None:
        from .blocks import BlocksScreen

        lora = self._chosen_lora()
        if not lora:
            self.notify(
                "no LoRA file yet: blocks can be edited once training has written one.", severity="warning"
            )
            return
        self.app.push_screen(BlocksScreen(self.job_id, lora, self.query_one(Gallery).current))

    def _chosen_lora(self) -> str:
        """The LoRA file under the cursor in the files tab, else the resized one, else the final one."""
        if self.query_one(TabbedContent).active == "artifacts":
            a = self.query_one(ArtifactsTable).selected
            if a is not None and _is_lora(a):
                return a.path
        job = self.job
        return (job.resized or job.final) if job else ""

    def action_cancel(self) -> None:
        self.app.cancel_job(self.job_id)

    def action_retry(self) -> None:
        self.app.retry_job(self.job_id)


def _level(event: pb.Event) -> str:
    """How the log draws an event: warnings and errors stand out, a failed job too."""
    if event.HasField("log"):
        return event.log.level
    if event.HasField("state"):
        return {pb.FAILED: "error", pb.CANCELLED: "warning"}.get(event.state.state, "info")
    return "info"


def _is_lora(artifact: pb.Artifact) -> bool:
    return artifact.kind in LORA_KINDS and artifact.path.endswith(".safetensors")
