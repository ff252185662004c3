"""The TUI's pure parts: the loss plot, bars, the sample index, the block vector being edited."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loradrop.errors import UserError
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.tui.formatting import bar, size_text
from loradrop.tui.images import fit_pixels, image_widget_class, protocol_name
from loradrop.tui.samples import SampleIndex
from loradrop.tui.vector import BlockVector
from loradrop.tui.widgets.loss_plot import braille_plot


def _dots(lines: list[str]) -> set[tuple[int, int]]:
    """(column, row) of every dot drawn, in dot units (2 per cell across, 4 down)."""
    bits = (
        (0, 0, 0x01),
        (0, 1, 0x02),
        (0, 2, 0x04),
        (1, 0, 0x08),
        (1, 1, 0x10),
        (1, 2, 0x20),
        (0, 3, 0x40),
        (1, 3, 0x80),
    )
    out = set()
    for r, line in enumerate(lines):
        for c, ch in enumerate(line):
            value = ord(ch) - 0x2800
            assert 0 <= value < 256
            out |= {(2 * c + dx, 4 * r + dy) for dx, dy, bit in bits if value & bit}
    return out


def test_the_loss_plot_falls_from_top_left_to_bottom_right_without_gaps():
    lines = braille_plot([(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.0)], width=10, height=3)
    assert len(lines) == 3 and all(len(line) == 10 for line in lines)
    dots = _dots(lines)
    assert (0, 0) in dots and (19, 11) in dots  # the highest loss top left, the lowest bottom right
    assert {c for c, _ in dots} == set(range(20))  # joined: a dot in every column
    assert max(r for c, r in dots if c == 10) > min(r for c, r in dots if c == 2)  # it goes down


def test_a_flat_loss_is_a_line_across_the_middle():
    dots = _dots(braille_plot([(1, 0.3), (5, 0.3)], width=4, height=2))
    assert dots == {(c, 4) for c in range(8)}


def test_bars_and_sizes():
    assert bar(0, 4) == "    "
    assert bar(1, 4) == "████"
    assert bar(0.5, 3) == "█▌ "
    assert bar(2, 2) == "██"
    assert [size_text(n) for n in (512, 2_862_832, 6_070_000_000)] == ["512 B", "2.9 MB", "6.1 GB"]


def _sample(seq: int, step: int, prompt: int) -> pb.Event:
    return pb.Event(
        seq=seq,
        kind="sample",
        sample=pb.SampleReady(
            path=f"/o/s{step}_p{prompt}.png", step=step, prompt_index=prompt, prompt=f"prompt {prompt}"
        ),
    )


def test_the_sample_index_orders_steps_newest_first_and_series_oldest_first():
    index = SampleIndex()
    assert index.add(pb.Event(seq=1, kind="log", log=pb.LogLine(text="hi"))) is None
    for seq, (step, prompt) in enumerate([(2, 0), (2, 1), (4, 0), (4, 1), (6, 0)], start=2):
        index.add(_sample(seq, step, prompt))
    assert index.steps == [6, 4, 2]
    assert index.prompts == [0, 1]
    assert [s.step for s in index.series(0)] == [2, 4, 6]
    assert [s.step for s in index.series(1)] == [2, 4]
    assert index.at(6, 1) is None
    assert index.at(4, 1).path == "/o/s4_p1.png"
    index.add(_sample(20, 4, 1))  # rendered again (a retried job): the newer one counts
    assert index.at(4, 1).seq == 20 and len(index) == 5


def test_the_block_vector_edits_and_refuses_what_does_not_fit():
    v = BlockVector.for_blocks(["INP01", "MID00", "OUT00"])
    assert v.text == "1,1,1,1" and v.is_identity
    v.nudge(1, -0.1)
    v.nudge(1, -0.1)
    v.set(3, 0)
    assert v.text == "1,0.8,1,0"
    v.apply("1,0,1,0")
    assert v.weights == [1, 0, 1, 0]
    assert BlockVector.for_blocks(["A", "B"], "0.5,1,0").weights == [0.5, 1, 0]
    with pytest.raises(UserError, match="needs 4"):
        v.apply("1,1,1")
    with pytest.raises(UserError, match="not a number"):
        BlockVector.for_blocks(["A", "B"], "1,R,1")
    with pytest.raises(UserError, match="finite"):
        v.set(0, float("inf"))


def test_each_forced_protocol_gets_its_widget():
    assert image_widget_class("none") is None and protocol_name(None) == "none"
    for protocol in ("sixel", "tgp", "halfcell"):
        assert protocol_name(image_widget_class(protocol)) == protocol
    assert (
        protocol_name(image_widget_class("auto")) == "unicode"
    )  # no terminal under pytest: textual-image's text fallback
    with pytest.raises(ValueError, match="kitty"):
        image_widget_class("kitty")


def test_samples_are_asked_for_at_the_size_the_widget_shows():
    assert fit_pixels(40, 12, "halfcell") == 40  # 40 cells across, 24 half-cells down
    assert fit_pixels(20, 20, "halfcell") == 40
    assert fit_pixels(40, 12, "sixel") >= 40 * 2  # real pixels: several per cell


def test_the_tui_and_montage_load_no_torch_and_no_engine():
    code = (
        "import sys\n"
        "import loradrop.commands.tui, loradrop.commands.montage, loradrop.tui.app\n"
        "import loradrop.tui.screens.queue, loradrop.tui.screens.job, loradrop.tui.screens.blocks\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'safetensors') or m.startswith('loradrop.engine')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_the_first_frame_loads_no_numpy_and_sixel_comes_out_the_same():
    """numpy, textual-image's optional sixel speed-up, was a fifth of what the TUI imported before
    its first frame. Imported without it, textual-image encodes the same bytes."""
    code = (
        "import sys\n"
        "from loradrop.tui.images import choose_pictures\n"
        "choose_pictures('sixel', 'truecolor')\n"
        "import loradrop.commands.tui, loradrop.tui.app\n"
        "assert 'numpy' not in sys.modules, 'numpy is loaded before the first frame'\n"
        "from PIL import Image\n"
        "from textual_image._sixel import image_to_sixels\n"
        "sys.stdout.write(image_to_sixels(Image.radial_gradient('L').convert('RGB').resize((96, 64))))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    without = run.stdout

    from PIL import Image
    from textual_image import _sixel

    assert _sixel._HAS_NUMPY  # here (numpy loaded first, by the tests) it took the numpy path
    image = Image.radial_gradient("L").convert("RGB").resize((96, 64))
    assert without.startswith("\x1bP") and without == _sixel.image_to_sixels(image)


def test_a_flooded_log_is_written_in_batches_and_loses_no_line():
    import asyncio

    from textual.app import App

    from loradrop.tui.widgets.stream_log import Line, StreamLog

    writes: list[int] = []

    class Counted(StreamLog):
        def flush(self):
            writes.append(len(self._pending))
            return super().flush()

    class One(App):
        def compose(self):
            yield Counted(max_lines=300)

    async def scenario():
        app = One()
        async with app.run_test() as pilot:
            log = app.query_one(Counted)
            log.add([Line("first")])
            assert log.lines == ["first"] and writes == [1]  # a quiet log shows a line at once
            for i in range(1000):  # a flood: within one flush period
                log.add([Line(f"line {i}")])
            await pilot.pause(0.3)
            assert log.received == 1001 and len(writes) <= 3
            assert log.lines[-1] == "line 999" and len(log.lines) == 300

    asyncio.run(scenario())


def test_state_colours_say_the_same_in_a_16_colour_terminal():
    """Textual maps colours through its theme and then to the terminal's 16 (TERM=xterm): there
    the theme's "yellow" came out bright red, and "queued" read as an error."""
    from rich.color import ColorSystem
    from rich.segment import Segment
    from rich.style import Style
    from textual._ansi_theme import DEFAULT_TERMINAL_THEME
    from textual.color import Color
    from textual.filter import ANSIToTruecolor

    from loradrop.tui.formatting import state_text

    names = ["black", "red", "green", "yellow", "blue", "magenta", "cyan", "white"]
    names += [f"bright_{n}" for n in names]

    def in_16_colours(state: int) -> str:
        style = Style.parse(state_text(state).style or "none")
        segment = ANSIToTruecolor(DEFAULT_TERMINAL_THEME).apply([Segment("x", style)], Color.parse("black"))[
            0
        ]
        colour = segment.style.color if segment.style else None
        return "default" if colour is None else names[colour.downgrade(ColorSystem.STANDARD).number]

    seen = {
        name: in_16_colours(code)
        for name, code in (
            ("queued", pb.QUEUED),
            ("running", pb.RUNNING),
            ("done", pb.DONE),
            ("failed", pb.FAILED),
            ("cancelled", pb.CANCELLED),
        )
    }
    assert seen["queued"] == "default"
    assert seen["failed"] in ("red", "bright_red")
    assert seen["done"] in ("green", "bright_green")
    assert "red" not in seen["running"] + seen["cancelled"] + seen["queued"]
    assert len(set(seen.values())) == 5, seen


def test_auto_pictures_give_way_to_their_path_where_the_terminal_has_16_colours():
    from loradrop.tui.images import choose_pictures

    few = choose_pictures(
        "auto", "standard", "xterm"
    )  # no terminal under pytest: auto would be unicode cells
    assert few.widget is None and "16 colours (TERM=xterm)" in few.why_not and "sixel" in few.why_not
    assert choose_pictures("auto", "truecolor").widget is not None
    assert choose_pictures("halfcell", "standard").widget is not None  # asked for by name: kept
    assert choose_pictures("none", "truecolor").widget is None


def test_long_log_lines_wrap_at_the_width_breaking_at_spaces():
    from loradrop.tui.widgets.stream_log import INDENT, wrap

    path = "warning: skipped /srv/loradrop/inbox/bad-dataset/orphan-caption-without-image.txt"
    rows = wrap(path, 40)
    assert "".join(r.strip() if i else r for i, r in enumerate(rows)).replace(" ", "") == path.replace(
        " ", ""
    )
    assert all(len(r) <= 40 for r in rows) and all(r.startswith(" " * INDENT) for r in rows[1:])
    assert rows[0] == path[:40]  # a path breaks at the edge: no space near enough
    prose = wrap("warning: this caption file has no image beside it, so it is skipped", 40)
    assert (
        prose[0] == "warning: this caption file has no image "
        and prose[1] == " " * INDENT + "beside it, so it is skipped"
    )
    assert wrap("short", 40) == ["short"]
    wide = "图" * 30  # two cells each
    assert (
        all(len(r.strip()) * 2 <= 40 for r in wrap(wide, 40))
        and "".join(r.strip() for r in wrap(wide, 40)) == wide
    )


def test_the_log_draws_every_row_of_a_wrapped_warning_in_its_colour():
    import asyncio

    from textual.app import App

    from loradrop.tui.formatting import WARNING
    from loradrop.tui.widgets.stream_log import Line, StreamLog

    class One(App):
        def compose(self):
            yield StreamLog(max_lines=100)

    async def scenario():
        app = One()
        async with app.run_test(size=(40, 10)) as pilot:
            log = app.query_one(StreamLog)
            text = "12:00:00 [3] warning: no image for /srv/loradrop/inbox/bad/orphan.txt; the caption is skipped"
            log.add([Line("12:00:00 [2] job running"), Line(text, "warning")])
            await pilot.pause()
            rows = [log.render_line(y) for y in range(6)]
            drawn = ["".join(segment.text for segment in row) for row in rows]
            assert drawn[0].startswith("12:00:00 [2] job running")
            assert "".join(d.strip() for d in drawn[1:]).replace(" ", "") == text.replace(
                " ", ""
            )  # nothing cut
            warned = [row for row, d in zip(rows, drawn) if d.strip() and row is not rows[0]]
            assert all(
                any(seg.style and seg.style.color and seg.style.color.triplet.hex == WARNING for seg in row)
                for row in warned
            )

    asyncio.run(scenario())
