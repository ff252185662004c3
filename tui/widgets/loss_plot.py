"""The training loss over the steps, as a small braille line plot (2×4 dots per cell)."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

# Bit of the dot at (column, row) inside a braille cell.
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


def braille_plot(points: list[tuple[float, float]], width: int, height: int) -> list[str]:
    """`height` lines of `width` braille cells drawing the (x, y) points joined by lines, x from
    the first point to the last across the width, y from the smallest (bottom) to the largest."""
    grid = [[0] * width for _ in range(height)]
    if not points or width < 1 or height < 1:
        return ["".join(chr(0x2800) for _ in range(width)) for _ in range(height)]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    dots_w, dots_h = 2 * width, 4 * height

    def dot(x: float, y: float) -> tuple[int, int]:
        col = 0 if x1 == x0 else round((x - x0) / (x1 - x0) * (dots_w - 1))
        row = dots_h // 2 if y1 == y0 else round((y1 - y) / (y1 - y0) * (dots_h - 1))
        return col, row

    def mark(col: int, row: int) -> None:
        grid[row // 4][col // 2] |= _DOTS[col % 2][row % 4]

    previous = None
    for x, y in points:
        col, row = dot(x, y)
        if previous is None:
            mark(col, row)
        else:  # join to the previous point, one dot per column and row crossed
            pc, pr = previous
            steps = max(abs(col - pc), abs(row - pr), 1)
            for i in range(1, steps + 1):
                mark(round(pc + (col - pc) * i / steps), round(pr + (row - pr) * i / steps))
        previous = (col, row)
    return ["".join(chr(0x2800 + bits) for bits in line) for line in grid]


class LossPlot(Widget):
    """Loss per step (each step's own, not averaged); the border title says the last, lowest and highest."""

    DEFAULT_CSS = "LossPlot { height: 5; border: round $primary-muted; color: $accent; }"

    def __init__(self, *, id: str | None = None):
        super().__init__(id=id)
        self.points: dict[int, float] = {}
        self.border_title = "loss"

    def add(self, step: int, loss: float) -> None:
        self.points[step] = loss
        values = list(self.points.values())
        # per step, not the running average the title line and the queue show: named so
        self.border_title = f"loss per step {self.points[max(self.points)]:.4f}  (min {min(values):.4f}, max {max(values):.4f}, {len(values)} steps)"
        self.refresh()

    def clear(self) -> None:
        self.points.clear()
        self.border_title = "loss"
        self.refresh()

    def render(self) -> Text:
        size = self.content_size
        if not self.points:
            return Text("no loss yet", style="dim")
        lines = braille_plot(sorted(self.points.items()), size.width, size.height)
        return Text("\n".join(lines))
