"""A line of text that the screens set on every event, redrawn only when its text changes."""

from __future__ import annotations

from textual.widgets import Static


class TextLine(Static):
    """Each new text of a Static costs a layout of the screen; a queue updated on every step of
    every job, and a title with a ticking ETA, mostly say again what they said."""

    def __init__(self, text: str = "", *, id: str | None = None):
        super().__init__(text, id=id)
        self.said = text

    def say(self, text: str) -> None:
        if text != self.said:
            self.said = text
            self.update(text)
