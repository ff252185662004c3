"""A LoRA's block vector: BASE and the UNet blocks with their tensors and energy, weights to edit,
the Inspire presets; Preview renders a sample prompt with the full-strength LoRA and with the
vector, one above the other, Chop writes the chopped file (both through the daemon)."""

from __future__ import annotations

import os
import threading
import time
import tomllib
import uuid

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, Static

from loradrop.errors import UserError
from loradrop.proto.v1 import loradrop_pb2 as pb

from ..formatting import size_text, weight_text
from ..images import Picture
from ..messages import PreviewProgressed
from ..samples import Sample, SampleIndex
from ..vector import ENTRY0_CHOP, ENTRY0_PREVIEW, STEP, BlockVector
from ..widgets.block_table import BlockTable
from .dialogs import Ask, Choose, Confirm


class BlocksScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("right,plus", f"nudge({STEP})", f"+{STEP:g}", priority=True),
        Binding("left,minus", f"nudge({-STEP})", f"-{STEP:g}", priority=True),
        Binding("0", "set(0)", "zero"),
        Binding("1", "set(1)", "one"),
        Binding("enter", "type", "type", priority=True),
        Binding("p", "preset", "presets"),
        Binding("v", "preview", "preview"),
        Binding("s", "steps", "preview steps", show=False),  # named in the preview's own text
        Binding("x", "chop", "chop"),
    ]

    def __init__(self, job_id: str, lora: str, sample: Sample | None = None):
        super().__init__()
        self.job_id, self.lora = job_id, lora
        self.sample = sample  # the training sample whose prompt the previews render
        self.block_layout: pb.BlockLayoutReply | None = None
        self.vector: BlockVector | None = None
        self.full_png: bytes | None = None  # the full-strength preview, rendered once
        self.previewed = ""  # the vector the lower preview shows
        self.rendering: threading.Event | None = None  # set to cancel the preview being rendered
        self.steps = 0  # denoising steps of a preview; 0: the daemon's quick look (at most 8)
        self._render_started = 0.0
        self._render_phase = ""
        self._render_ids: dict[str, str] = {}  # request id -> which picture it renders
        self._render_step = ""  # how far the daemon says the one rendering is
        self.chopped: pb.Artifact | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"[b]{escape(os.path.basename(self.lora))}[/]  reading its blocks …", id="blocks-file")
        yield Static(escape(self.lora), id="blocks-path")  # whole, wrapped if it must be: a path is to copy
        yield Static(id="entry0")
        with Horizontal(id="blocks-main"):
            yield BlockTable(id="blocks-table")
            with Vertical(id="preview-pane"):
                yield Label("full strength", id="label-full", classes="preview-label")
                yield Picture(self.app.pictures, "v: preview\n(s: its steps)", id="preview-full")
                yield Label("with the vector", id="label-vector", classes="preview-label")
                yield Picture(self.app.pictures, "", id="preview-vector")
        yield Static(id="vector-line")
        yield Footer(compact=True)  # every key fits an 80-column terminal

    def on_mount(self) -> None:
        self.app.call(self, "blocks", lambda c: c.block_layout(self.lora), self._loaded)
        self.query_one(BlockTable).focus()
        self.set_interval(1.0, self._show_rendering)

    def on_unmount(self) -> None:
        if self.rendering is not None:
            self.rendering.set()  # nobody is left to look at it

    def _loaded(self, layout: pb.BlockLayoutReply) -> None:
        self.block_layout = layout
        labels = [b.label for b in layout.blocks]
        job = self.app.jobs.get(self.job_id)
        try:
            self.vector = BlockVector.for_blocks(labels, job.block_vector if job else "")
        except UserError:  # the job's vector has random tokens or another length: start from ones
            self.vector = BlockVector.for_blocks(labels)
        self.query_one(BlockTable).load(layout, self.vector)
        self.query_one("#blocks-file", Static).update(
            f"[b]{escape(os.path.basename(self.lora))}[/]  {len(layout.blocks)} blocks, {layout.pass_through} tensors pass through"
        )
        self._show_vector()

    def _show_vector(self) -> None:
        if self.vector is None:
            return
        base = weight_text(self.vector.weights[0])
        self.query_one("#entry0", Static).update(
            f"entry 0 = {base}:  {ENTRY0_CHOP}.\n             {ENTRY0_PREVIEW}."
        )
        line = f"vector  {self.vector.text}"
        if self.chopped is not None:  # the whole path, wrapped if it must be: it is what to copy
            line += f"\nchopped ({size_text(self.chopped.bytes)}): {self.chopped.path}"
        self.query_one("#vector-line", Static).update(escape(line))
        if self.previewed:
            changed = self.previewed != self.vector.text
            self.query_one("#label-vector", Label).update(
                "with an earlier vector (v)" if changed else "with the vector"
            )

    # ------------------------------------------------------------------ editing

    @property
    def table(self) -> BlockTable:
        return self.query_one(BlockTable)

    def _edit(self, change) -> None:
        if self.vector is None:
            return
        index = self.table.selected
        change(index)
        self.table.show_weight(index)
        self._show_vector()

    def action_nudge(self, delta: float) -> None:
        self._edit(lambda i: self.vector.nudge(i, delta))

    def action_set(self, value: float) -> None:
        self._edit(lambda i: self.vector.set(i, value))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_type()

    def action_type(self) -> None:
        if self.vector is None:
            return
        index = self.table.selected
        label = self.vector.labels[index]

        def answered(text: str | None) -> None:
            if not text:
                return
            try:
                value = float(text)
                self._edit(lambda i: self.vector.set(i, value))
            except (ValueError, UserError):
                self.notify(
                    f"{text!r} is not a number; the weight of {label} stays {weight_text(self.vector.weights[index])}.",
                    severity="error",
                )

        self.app.push_screen(
            Ask(f"Weight of {label} (entry {index}):", weight_text(self.vector.weights[index])), answered
        )

    def action_preset(self) -> None:
        if self.vector is None:
            return
        fitting = {
            p.name: p.vector
            for p in self.block_layout.presets
            if len(p.vector.split(",")) == len(self.vector.labels)
        }
        if not fitting:
            self.notify(
                f"no Inspire preset has {len(self.vector.labels)} entries (this LoRA's blocks + BASE).",
                severity="warning",
            )
            return

        def chosen(name: str | None) -> None:
            if name:
                self.vector.apply(fitting[name])
                self.table.show_all()
                self._show_vector()
                self.notify(f"preset {name}")

        self.app.push_screen(Choose("Inspire preset (Lora Loader Block Weight):", fitting), chosen)

    # ------------------------------------------------------------------ through the daemon

    def action_preview(self) -> None:
        """Render the preview pair (the full-strength one only the first time); v again cancels."""
        if self.rendering is not None:
            self.rendering.set()
            return
        if self.vector is None:
            return
        full = self.query_one("#preview-full", Picture)
        weighted = self.query_one("#preview-vector", Picture)
        size = max(full.fit(), weighted.fit())
        vector = self.vector.text
        job = self.app.jobs.get(self.job_id)
        cancel = self.rendering = threading.Event()
        self._render_started = time.monotonic()
        self._phase("full strength" if self.full_png is None else "with the vector")

        full_id, vector_id = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]  # their progress events say which
        self._render_ids = {full_id: "full strength", vector_id: "with the vector"}
        steps = self.steps

        def render(client):
            prompts, seed = preview_prompt(client, job, self.sample)
            common = dict(prompts=prompts, seed=seed, max_size=size, steps=steps, cancel=cancel)
            if self.full_png is None:
                self.app.call_from_thread(
                    self._full_done, client.preview(self.lora, request_id=full_id, **common)
                )
                self.app.call_from_thread(self._phase, "with the vector")
            return client.preview(self.lora, vector=vector, request_id=vector_id, **common)

        def failed(e) -> None:
            self.rendering = None
            if not self.is_attached:
                return  # left while it rendered (which cancelled it)
            said = "preview cancelled (v: again)" if cancel.is_set() else "preview failed"
            if not cancel.is_set():
                self.notify(str(e), title="preview", severity="error", timeout=8)
            weighted.show(None, said)
            if self.full_png is None:
                full.show(None, said)

        self.app.call(
            self,
            "preview",
            render,
            lambda images: self._vector_done(vector, images),
            failed=failed,
            quiet=True,
        )

    def _phase(self, phase: str) -> None:
        self._render_phase, self._render_step = phase, ""
        self._show_rendering()

    def on_preview_progressed(self, message: PreviewProgressed) -> None:
        p = message.progress
        if self.rendering is not None and self._render_ids.get(p.request_id) == self._render_phase:
            image = f"image {p.image}/{p.images}, " if p.images > 1 else ""
            self._render_step = f"{image}step {p.step}/{p.steps}"
            self._show_rendering()

    def action_steps(self) -> None:
        def answered(text: str | None) -> None:
            if text is None or text == "":
                return
            if not text.isdigit() or not 0 <= int(text) <= 150:
                self.notify(
                    f"{text!r} is not a step count from 0 to 150; previews keep {self.steps or 'the quick look'}.",
                    severity="error",
                )
                return
            self.steps = int(text)
            self.notify(
                f"previews render with {self.steps} steps"
                if self.steps
                else "previews are a quick look (at most 8 steps)"
            )

        self.app.push_screen(
            Ask(
                "Denoising steps of a preview (1-150; 0: a quick look, at most 8; more takes longer):",
                str(self.steps),
            ),
            answered,
        )

    def _show_rendering(self) -> None:
        """While a preview renders: which picture, for how long so far, and how to stop it. The
        daemon renders it in the training worker, between steps of a running job, so it can take
        a while on a busy machine."""
        if self.rendering is None or not self.is_attached:
            return
        waited = f"{time.monotonic() - self._render_started:.0f} s"
        for picture, phase in (("#preview-full", "full strength"), ("#preview-vector", "with the vector")):
            if phase == self._render_phase:
                # Before its first step it waits for the worker (a training job's step, say).
                done = self._render_step or "waiting for the worker"
                self.query_one(picture, Picture).show(
                    None, f"rendering {phase}: {done} … {waited}\n(v again: cancel)"
                )
            elif phase == "with the vector":
                self.query_one(picture, Picture).show(None, "waits for the one above")

    def _full_done(self, images: list[pb.Image]) -> None:
        if images and self.is_attached:
            self.full_png = images[0].png
            self.query_one("#preview-full", Picture).show(images[0].png, images[0].path)

    def _vector_done(self, vector: str, images: list[pb.Image]) -> None:
        self.rendering = None
        if images:
            self.previewed = vector
            self.query_one("#preview-vector", Picture).show(images[0].png, f"{images[0].path}\n{vector}")
            self._show_vector()

    def action_chop(self) -> None:
        if self.vector is None:
            return
        vector = self.vector.text
        warn = ""
        if self.vector.weights[0] != 1.0:
            warn = f"\nEntry 0 = {weight_text(self.vector.weights[0])} scales every UNet block in the chop (the preview used it for the text encoders)."

        def answered(yes: bool | None) -> None:
            if yes:
                self.app.call(self, "chop", lambda c: c.chop(self.lora, vector), self._chop_done)

        self.app.push_screen(
            Confirm(f"Chop {os.path.basename(self.lora)} with {vector}?{warn}", yes="Chop"), answered
        )

    def _chop_done(self, artifact: pb.Artifact) -> None:
        self.chopped = artifact
        self._show_vector()
        self.notify(f"wrote {artifact.path} ({size_text(artifact.bytes)})", title="chop")


def preview_prompt(client, job: pb.Job | None, sample: Sample | None) -> tuple[list[str], int | None]:
    """The prompt line and seed that render `sample` (default: the job's newest sample of its first
    prompt) again: its text, its size (read from the image) and the seed training used for it
    (the recipe's seed plus the prompt's index). A sample event carries only the text, so its
    step count cannot be repeated. A job without samples: no prompt, the daemon's defaults."""
    if sample is None and job is not None:
        index = SampleIndex()
        for event in client.events(job.id, follow=False):
            index.add(event)
        sample = index.series(index.prompts[0])[-1] if index.prompts else None
    if sample is None:
        return [], None
    image = client.sample(sample.path, max_size=16)  # for its original size; the pixels are not needed
    seed = (
        tomllib.loads(job.recipe_toml).get("seed", 0) + sample.prompt_index
        if job and job.recipe_toml
        else None
    )
    return [f"{sample.prompt} --w {image.original_width} --h {image.original_height}"], seed
