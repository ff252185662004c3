"""A LoRA's block vector: BASE and the UNet blocks with their tensors and energy, weights to edit,
the Inspire presets; Preview renders a sample prompt with the vector beside the full-strength
LoRA, Chop writes the chopped file (both through the daemon)."""

from __future__ import annotations

import os
import tomllib

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, Static

from loradrop.errors import UserError
from loradrop.proto.v1 import loradrop_pb2 as pb

from ..formatting import size_text, weight_text
from ..images import Picture
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
        Binding("x", "chop", "chop"),
    ]

    def __init__(self, job_id: str, lora: str, sample: Sample | None = None):
        super().__init__()
        self.job_id, self.lora = job_id, lora
        self.sample = sample  # the training sample whose prompt the previews render
        self.block_layout: pb.BlockLayoutReply | None = None
        self.vector: BlockVector | None = None
        self.full_png: bytes | None = None  # the full-strength preview, rendered once
        self.chopped: pb.Artifact | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"[b]{os.path.basename(self.lora)}[/]  reading its blocks …", id="blocks-file")
        yield Static(id="entry0")
        with Horizontal(id="blocks-main"):
            yield BlockTable(id="blocks-table")
            with Vertical(id="preview-pane"):
                yield Label("full strength", id="label-full", classes="preview-label")
                yield Picture(self.app.image_class, "v: preview", id="preview-full")
                yield Label("with the vector", id="label-vector", classes="preview-label")
                yield Picture(self.app.image_class, "", id="preview-vector")
        yield Static(id="vector-line")
        yield Footer(compact=True)  # every key fits an 80-column terminal

    def on_mount(self) -> None:
        self.app.call(self, "blocks", lambda c: c.block_layout(self.lora), self._loaded)
        self.query_one(BlockTable).focus()

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
            f"[b]{os.path.basename(self.lora)}[/]  {len(layout.blocks)} blocks, {layout.pass_through} tensors pass through  ·  {self.lora}"
        )
        self._show_vector()

    def _show_vector(self) -> None:
        if self.vector is None:
            return
        base = weight_text(self.vector.weights[0])
        self.query_one("#entry0", Static).update(f"entry 0 = {base}:  {ENTRY0_CHOP}.\n             {ENTRY0_PREVIEW}.")
        line = f"vector  {self.vector.text}"
        if self.chopped is not None:
            line += f"\nchopped {self.chopped.path}  ({size_text(self.chopped.bytes)})"
        self.query_one("#vector-line", Static).update(line)

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
                self.notify(f"{text!r} is not a number; the weight of {label} stays {weight_text(self.vector.weights[index])}.", severity="error")

        self.app.push_screen(Ask(f"Weight of {label} (entry {index}):", weight_text(self.vector.weights[index])), answered)

    def action_preset(self) -> None:
        if self.vector is None:
            return
        fitting = {p.name: p.vector for p in self.block_layout.presets if len(p.vector.split(",")) == len(self.vector.labels)}
        if not fitting:
            self.notify(f"no Inspire preset has {len(self.vector.labels)} entries (this LoRA's blocks + BASE).", severity="warning")
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
        if self.vector is None:
            return
        full = self.query_one("#preview-full", Picture)
        weighted = self.query_one("#preview-vector", Picture)
        size = max(full.fit(), weighted.fit())
        vector = self.vector.text
        weighted.show(None, "rendering …")
        if self.full_png is None:
            full.show(None, "rendering …")
        job = self.app.jobs.get(self.job_id)

        def render(client):
            prompts, seed = preview_prompt(client, job, self.sample)
            if self.full_png is None:
                self.app.call_from_thread(self._full_done, client.preview(self.lora, prompts=prompts, seed=seed, max_size=size))
            return client.preview(self.lora, vector=vector, prompts=prompts, seed=seed, max_size=size)

        def failed(e) -> None:
            weighted.show(None, "preview failed")
            if self.full_png is None:
                full.show(None, "preview failed")

        self.app.call(self, "preview", render, lambda images: self._vector_done(vector, images), failed=failed)

    def _full_done(self, images: list[pb.Image]) -> None:
        if images and self.is_attached:
            self.full_png = images[0].png
            self.query_one("#preview-full", Picture).show(images[0].png, images[0].path)

    def _vector_done(self, vector: str, images: list[pb.Image]) -> None:
        if images:
            self.query_one("#preview-vector", Picture).show(images[0].png, f"{images[0].path}\n{vector}")
            self.query_one("#label-vector", Label).update(f"with {vector}")

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

        self.app.push_screen(Confirm(f"Chop {os.path.basename(self.lora)} with {vector}?{warn}", yes="Chop"), answered)

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
    seed = tomllib.loads(job.recipe_toml).get("seed", 0) + sample.prompt_index if job and job.recipe_toml else None
    return [f"{sample.prompt} --w {image.original_width} --h {image.original_height}"], seed
