"""A job's captions: each image of its dataset as pixels beside its caption, edited in place;
a tag added to or removed from every caption at once; accept, and a job held for review goes on.

Every edit is written to the dataset's caption file by the daemon (SetCaption, atomically) as
soon as it is made (enter, or moving to another image), so a dropped connection loses at most
the line being typed; the screen never keeps captions of its own.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static

from loradrop.proto.v1 import loradrop_pb2 as pb

from ..images import Picture
from .dialogs import Ask


class CaptionScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("pagedown,ctrl+n", "move(1)", "next"),
        Binding("pageup,ctrl+p", "move(-1)", "previous"),
        Binding("ctrl+t", "tag('add')", "add tag"),
        Binding("ctrl+r", "tag('remove')", "remove tag"),
        Binding("ctrl+y", "accept", "accept"),
    ]

    def __init__(self, job_id: str):
        super().__init__()
        self.job_id = job_id
        self.captions: list[pb.Caption] = []
        self.index = 0

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="caption-pane"):
            yield Picture(self.app.pictures, "loading the dataset…", id="caption-picture")
            with Vertical(id="caption-side"):
                yield Static("", id="caption-position")
                yield Input(
                    placeholder="the caption: tags separated by commas, or a sentence", id="caption-text"
                )
                yield Static(
                    "enter: save  ·  pgdn/pgup: next/previous (saves)  ·  ctrl+t/ctrl+r: add/remove a tag everywhere  ·  ctrl+y: accept",
                    id="caption-keys",
                )
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#caption-text", Input).focus()
        self.reload()

    def reload(self) -> None:
        self.app.call(self, "captions", lambda c: c.captions(self.job_id), self._loaded)

    def _loaded(self, captions: list[pb.Caption]) -> None:
        self.captions = captions
        self.index = min(self.index, max(len(captions) - 1, 0))
        self.show()

    @property
    def current(self) -> pb.Caption | None:
        return self.captions[self.index] if self.captions else None

    def show(self) -> None:
        caption, field = self.current, self.query_one("#caption-text", Input)
        picture = self.query_one("#caption-picture", Picture)
        if caption is None:
            self.query_one("#caption-position", Static).update(
                f"job {escape(self.job_id)}: its dataset has no images"
            )
            picture.show(None, "no images")
            return
        name = PurePosixPath(caption.image).name
        state = "" if caption.exists else "  (no caption file yet)"
        self.query_one("#caption-position", Static).update(
            f"[b]{escape(name)}[/]  {self.index + 1}/{len(self.captions)}{state}"
        )
        field.value = caption.text
        shown = caption.image

        def arrived(png: bytes) -> None:
            if self.current is not None and self.current.image == shown:  # not moved on meanwhile
                picture.show(png, name)

        picture.show(None, f"loading {name}…")
        size = picture.fit() if picture.content_size.area else 512  # before the first layout: a fair guess
        self.app.fetch_sample(self, caption.image, size, arrived)

    # ------------------------------------------------------------------ edits

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._save()

    def _save(self) -> None:
        """Write the field's text when it differs from the caption file's."""
        caption = self.current
        text = self.query_one("#caption-text", Input).value.strip()
        if caption is None or (text == caption.text and caption.exists):
            return
        index = self.index
        self.app.call(
            self,
            "caption",
            lambda c: c.set_caption(self.job_id, caption.image, text),
            lambda saved: self._saved(index, saved),
        )

    def _saved(self, index: int, saved: pb.Caption) -> None:
        if index < len(self.captions):
            self.captions[index] = saved
        self.notify(f"saved {PurePosixPath(saved.caption_file).name}", timeout=2)

    def action_move(self, delta: int) -> None:
        if not self.captions:
            return
        self._save()
        self.index = (self.index + delta) % len(self.captions)
        self.show()

    def action_tag(self, how: str) -> None:
        self._save()

        def answered(tag: str | None) -> None:
            if tag:
                self._bulk(how, tag.strip())

        question = (
            "Tag to put first in every caption:" if how == "add" else "Tag to remove from every caption:"
        )
        self.app.push_screen(Ask(question, placeholder="zkw"), answered)

    def _bulk(self, how: str, tag: str) -> None:
        changes = [(c.image, text) for c in self.captions if (text := retag(c.text, tag, how)) != c.text]

        def write(client) -> int:
            for image, text in changes:
                client.set_caption(self.job_id, image, text)
            return len(changes)

        def written(count: int) -> None:
            self.notify(f"{'added' if how == 'add' else 'removed'} {tag!r} in {count} caption(s)", timeout=3)
            self.reload()

        self.app.call(self, "captions", write, written, failed=lambda _e: self.reload())

    def action_accept(self) -> None:
        self._save()
        job = self.app.jobs.get(self.job_id)
        if job is None or job.state != pb.REVIEW:
            self.notify(
                f"job {self.job_id} is not waiting for caption review; the captions are saved as they are.",
                severity="warning",
            )
            return

        def accepted(job: pb.Job) -> None:
            self.app.jobs[job.id] = job
            self.notify(f"{job.id}: captions accepted, the job is queued")
            self.app.pop_screen()

        self.app.call(self, "accept", lambda c: c.accept_captions(self.job_id), accepted)


def retag(caption: str, tag: str, how: str) -> str:
    """The caption with `tag` first (added, or moved there), or without it (removed)."""
    tags = [t.strip() for t in caption.split(",") if t.strip() and t.strip() != tag]
    return ", ".join([tag, *tags] if how == "add" else tags)
