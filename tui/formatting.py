"""Short texts for the screens: states, sizes, bars, weights; the colours they use."""

from __future__ import annotations

from rich.text import Text

from loradrop.proto.client import state_name

# Colours as RGB, not ANSI names: Textual maps an ANSI name through its theme first, and in a
# 16-colour terminal (TERM=xterm) the theme's "yellow" comes out bright red and its "magenta" as
# its red. Each of these comes out as the colour it names in 16 colours too (tests/tui/test_parts.py).
OK, BUSY, WARNING, ERROR, MUTED = "#98e024", "#58d1eb", "#f0e060", "#ff5555", "#a0a0a0"
STATE_STYLES = {
    "queued": "",
    "running": f"bold {BUSY}",
    "done": OK,
    "failed": f"bold {ERROR}",
    "cancelled": MUTED,
    "review": f"bold {WARNING}",
}
_EIGHTHS = " ▏▎▍▌▋▊▉█"


def state_text(state: int) -> Text:
    name = state_name(state)
    return Text(name, style=STATE_STYLES.get(name, ""))


def size_text(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def bar(fraction: float, width: int) -> str:
    """A horizontal bar `width` cells long, filled to `fraction` in eighths of a cell."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[part] if part else "")).ljust(width)


def weight_text(w: float) -> str:
    return f"{w:g}"
