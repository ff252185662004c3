"""A log for a stream that may flood."""

from __future__ import annotations

import time

from textual.timer import Timer
from textual.widgets import Log


class StreamLog(Log):
    """A `Log` that writes what arrives at most ten times a second, in batches.

    Every write of a `Log` costs a repaint (and a size worker thread); at a thousand lines a
    second that kept the UI busy enough to delay key presses past 100 ms. Batched, the same
    flood costs ten repaints a second, and a quiet log still shows each line at once."""

    FLUSH_EVERY = 0.1  # seconds

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received = 0  # lines handed to `add` in all (the widget keeps the last max_lines)
        self._pending: list[str] = []
        self._flushed = 0.0
        self._timer: Timer | None = None

    def add(self, lines: list[str]) -> None:
        self.received += len(lines)
        self._pending.extend(lines)
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
        if self._pending:
            lines, self._pending = self._pending, []
            self.write_lines(lines)
            self._flushed = time.monotonic()
