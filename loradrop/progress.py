"""A one-line progress display for long work in a terminal (training, caching, following a job).

On a TTY the line redraws in place; elsewhere (logs, CI) it prints a line at most every few
seconds, so a piped log stays readable.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    seconds = int(seconds + 0.5)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressLine:
    def __init__(self, stream: TextIO | None = None, *, width: int = 24, interval: float = 5.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = width
        self.interval = interval
        self._last_print = 0.0
        self._shown = ""
        self._lock = threading.Lock()

    def update(self, label: str, done: int, total: int, extra: str = "") -> None:
        frac = done / total if total else 0.0
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        text = f"{label} {done}/{total} [{bar}] {extra}".rstrip()
        with self._lock:
            if self.tty:
                self.stream.write("\r\x1b[2K" + text)
                self.stream.flush()
                self._shown = text
            elif done >= total or time.monotonic() - self._last_print >= self.interval:
                self.stream.write(text + "\n")
                self.stream.flush()
                self._last_print = time.monotonic()

    def message(self, text: str) -> None:
        """Print a line above the bar (the bar is redrawn on the next update)."""
        with self._lock:
            if self.tty and self._shown:
                self.stream.write("\r\x1b[2K")
            self.stream.write(text + "\n")
            if self.tty and self._shown:
                self.stream.write(self._shown)
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self.tty and self._shown:
                self.stream.write("\n")
                self.stream.flush()
            self._shown = ""


FIGURES = ("loss", "avg_loss", "lr_unet", "rate", "eta_s")


def figures_of(progress) -> dict[str, float]:
    """The figures a progress message carries (a `pb.Progress`: its set optional fields)."""
    return {f: getattr(progress, f) for f in FIGURES if progress.HasField(f)}


def describe_progress(
    *,
    loss: float | None = None,
    avg_loss: float | None = None,
    lr_unet: float | None = None,
    rate: float | None = None,
    eta_s: float | None = None,
) -> str:
    """The text after a progress event's count: `train`'s and the demo's bars, `logs`' lines."""
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if avg_loss is not None:
        parts.append(f"avg {avg_loss:.4f}")
    if lr_unet is not None:
        parts.append(f"lr {lr_unet:.2e}")
    if rate:
        parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)
