"""A job's log: lines wrapped at the widget's width, warnings and errors in colour, and a stream that
may flood written in batches."""

from __future__ import annotations

import re
import time
from bisect import bisect_right
from dataclasses import dataclass

from rich.cells import cell_len, chop_cells
from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.timer import Timer

from ..formatting import ERROR, WARNING

INDENT = 4  # a wrapped line's continuation rows start this far in
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")  # would move the terminal's cursor: drawn as �
LEVEL_STYLES = {"warning": Style.parse(WARNING), "error": Style.parse(f"bold {ERROR}")}


@dataclass(frozen=True)
class Line:
    text: str
    level: str = "info"  # "info", "warning" or "error": how it is drawn


def wrap(text: str, width: int) -> list[str]:
    """`text` in rows of at most `width` cells, broken at a space where one sits in the row's second
    half (a path has none: it breaks at the edge), the rows after the first indented."""
    rows, rest, room = [], text, max(width, 1)
    while cell_len(rest) > room:
        head = rest[:room] if len(rest) == cell_len(rest) else chop_cells(rest, room)[0]
        space = head.rfind(" ")
        if space > room // 2:
            head = head[: space + 1]
        rows.append(head)
        rest = rest[len(head) :]
        if len(rows) == 1:
            room = max(width - INDENT, 1)
    rows.append(rest)
    return [rows[0], *(" " * INDENT + row for row in rows[1:])] if width > INDENT else rows


class StreamLog(ScrollView, can_focus=True):
    """Lines as `loradrop logs` prints them, each wrapped to the width (a warning ending in a path
    is read to its end); at most `max_lines` kept.

    Writing what arrives at most ten times a second keeps a flood of a thousand lines a second
    from delaying key presses; a quiet log still shows each line at once. Only the rows on
    screen are drawn; wrapping counts each line's rows once per width."""

    DEFAULT_CSS = """
    StreamLog { background: $surface; color: $text; overflow-y: scroll; overflow-x: hidden; scrollbar-gutter: stable; }
    StreamLog:focus { background-tint: $foreground 5%; }
    """
    FLUSH_EVERY = 0.1  # seconds

    def __init__(self, *, max_lines: int | None = None, id: str | None = None):
        super().__init__(id=id)
        self.max_lines = max_lines
        self.received = 0  # lines handed to `add` in all (the widget keeps the last max_lines)
        self._lines: list[Line] = []
        self._starts: list[int] = [0]  # the first row of each line, and the row count at the end
        self._width = 0  # the width `_starts` was counted at
        self._pending: list[Line] = []
        self._flushed = 0.0
        self._timer: Timer | None = None

    @property
    def lines(self) -> list[str]:
        return [line.text for line in self._lines]

    def add(self, lines: list[Line]) -> None:
        self.received += len(lines)
        for line in lines:  # a line of several (a traceback) takes a row each, in its level's colour
            self._pending += [
                Line(_CONTROL.sub("\ufffd", part.expandtabs()), line.level) for part in line.text.split("\n")
            ]
        if self.max_lines is not None and len(self._pending) > self.max_lines:
            del self._pending[: -self.max_lines]  # they would scroll away unseen
        if self._timer is None:
            wait = self._flushed + self.FLUSH_EVERY - time.monotonic()
            if wait <= 0:
                self.flush()
            else:
                self._timer = self.set_timer(wait, self.flush)

    def flush(self) -> None:
        self._timer = None
        if not self._pending:
            return
        at_end = self.is_vertical_scroll_end
        new, self._pending = self._pending, []
        self._lines.extend(new)
        over = len(self._lines) - self.max_lines if self.max_lines is not None else 0
        if over > 0:
            del self._lines[:over]
            self._count_rows()
        else:
            self._count_rows(new)
        self._flushed = time.monotonic()
        if at_end:
            self.scroll_end(animate=False, immediate=True, x_axis=False)
        self.refresh()

    # ------------------------------------------------------------------ rows

    def _count_rows(self, new: list[Line] | None = None) -> None:
        """Row starts for every line, or (with `new`) for the lines just appended."""
        width = self.scrollable_content_region.width
        if new is None or width != self._width:
            self._width, self._starts, new = width, [0], self._lines
        if width > 0:
            starts = self._starts
            for line in new:
                starts.append(starts[-1] + len(wrap(line.text, width)))
        self.virtual_size = Size(width, self._starts[-1])

    def on_resize(self) -> None:
        if self.scrollable_content_region.width != self._width:
            at_end = self.is_vertical_scroll_end
            self._count_rows()
            if at_end:
                self.scroll_end(animate=False, immediate=True, x_axis=False)

    def render_line(self, y: int) -> Strip:
        row = round(self.scroll_offset.y) + y
        base = self.rich_style
        width = self.scrollable_content_region.width
        if width <= 0 or row >= self._starts[-1] or len(self._starts) != len(self._lines) + 1:
            return Strip.blank(width, base)
        index = bisect_right(self._starts, row) - 1
        line = self._lines[index]
        text = wrap(line.text, self._width)[row - self._starts[index]]
        style = base + LEVEL_STYLES[line.level] if line.level in LEVEL_STYLES else base
        return Strip([Segment(text, style)], cell_len(text)).crop_extend(0, width, base)
