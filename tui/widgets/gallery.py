"""A job's samples: one picture at a time, newest step first, moved by step and by prompt; and
the training montage (one prompt's samples played over the steps)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.timer import Timer
from textual.widgets import Static

from ..images import Picture, Pictures
from ..samples import Sample, SampleIndex

FPS = 4.0


class Gallery(Vertical, can_focus=True):
    BINDINGS = [
        Binding("left", "step(1)", "older"),
        Binding("right", "step(-1)", "newer"),
        Binding("up", "prompt(-1)", "prompt"),
        Binding("down", "prompt(1)", "prompt", show=False),
        Binding("space", "play", "montage"),
    ]

    def __init__(self, index: SampleIndex, pictures: Pictures, *, id: str | None = None):
        super().__init__(id=id)
        self.index = index
        self.pictures = pictures
        self.step: int | None = None  # the step shown; None: the newest, following new samples
        self.prompt: int | None = None  # the prompt index shown; None: the first
        self.playing = False
        self.frame = 0
        self._timer: Timer | None = None
        self.shown: tuple[Sample, int] | None = None  # the sample drawn, and the size it was fetched at

    def compose(self) -> ComposeResult:
        yield Picture(self.pictures, "no samples yet", id="sample-picture")
        yield Static("", id="sample-caption")

    # ------------------------------------------------------------------ what is shown

    @property
    def current(self) -> Sample | None:
        steps, prompts = self.index.steps, self.index.prompts
        if not steps:
            return None
        prompt = self.prompt if self.prompt in prompts else prompts[0]
        if self.playing:
            series = self.index.series(prompt)
            return series[self.frame % len(series)] if series else None
        return self.index.at(self.step if self.step in steps else steps[0], prompt)

    def samples_changed(self) -> None:
        """New samples arrived: show the newest while the user is at the newest step."""
        if not self.playing:
            self.show()

    def show(self) -> None:
        sample = self.current
        # a fixed height: a montage's caption changes four times a second without a new layout
        self.query_one("#sample-caption", Static).update(self._caption(sample), layout=False)
        picture = self.query_one(Picture)
        if sample is None:
            self.shown = None
            steps = self.index.steps
            picture.show(
                None, "no samples yet" if not steps else "this prompt has no sample at this step (yet)"
            )
            return
        if picture.content_size.area == 0:
            return  # not on screen (another tab): fetched when shown, at the size it then has
        size = picture.fit()
        if self.shown is not None and self.shown[0] == sample and self.shown[1] >= size:
            return  # a smaller widget (a resize): the picture it has scales down, no new fetch

        def arrived(png: bytes) -> None:
            if self.current == sample:  # the user may have moved on while it was fetched
                self.shown = (sample, size)
                picture.show(png, f"{sample.path}\n(step {sample.step}, prompt {sample.prompt_index})")

        self.app.fetch_sample(self, sample.path, size, arrived)

    def on_resize(self) -> None:
        self.show()

    def _caption(self, sample: Sample | None) -> str:
        steps, prompts = self.index.steps, self.index.prompts
        if sample is None:
            return "samples appear here as training renders them" if not steps else ""
        prompt_no = prompts.index(sample.prompt_index) + 1
        prompt = f"prompt {prompt_no}/{len(prompts)}: {sample.prompt}"
        if self.playing:
            series = self.index.series(sample.prompt_index)
            return (
                f"▶ montage  step {sample.step} ({self.frame % len(series) + 1}/{len(series)})  ·  {prompt}"
            )
        position = steps.index(sample.step) + 1
        newest = ", newest" if position == 1 else ""
        return f"step {sample.step} ({position}/{len(steps)}{newest})  ·  {prompt}"

    # ------------------------------------------------------------------ keys

    def action_step(self, delta: int) -> None:
        """delta 1: an older step, -1: a newer one (the list is newest first)."""
        self._stop()
        steps = self.index.steps
        if steps:
            at = steps.index(self.step) if self.step in steps else 0
            at = min(max(at + delta, 0), len(steps) - 1)
            self.step = None if at == 0 else steps[at]
        self.show()

    def action_prompt(self, delta: int) -> None:
        prompts = self.index.prompts
        if prompts:
            at = prompts.index(self.prompt) if self.prompt in prompts else 0
            self.prompt = prompts[(at + delta) % len(prompts)]
        self.frame = 0
        self.show()

    def action_play(self) -> None:
        if self.playing:
            self._stop()
            self.show()
            return
        if not self.index.steps:
            return
        self.playing, self.frame = True, 0
        size = self.query_one(Picture).fit()
        for sample in self.index.series(
            self.current.prompt_index
        ):  # fetch every frame now, so it plays smoothly
            self.app.fetch_sample(self, sample.path, size, None)
        self._timer = self.set_interval(1 / FPS, self._next_frame)
        self.show()

    def _next_frame(self) -> None:
        self.frame += 1
        self.show()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.playing = False
