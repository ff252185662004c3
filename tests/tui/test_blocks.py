"""The blocks screen on a trained job's LoRA: weights edited by keys and by typing, a preset, a
preview through the daemon under the full-strength one (cancelled once), and a chop that writes a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from loradrop.tui.images import Picture
from loradrop.tui.screens.blocks import BlocksScreen
from loradrop.tui.screens.dialogs import Ask, Choose, Confirm
from loradrop.tui.widgets.block_table import BlockTable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_edit_preset_preview_and_chop(trained, tui):
    job = trained.job
    lora = job.resized or job.final
    with trained.daemon.client() as c:
        layout = c.block_layout(lora)
    outall = next(p.vector for p in layout.presets if p.name == "SDXL-LyC-OUTALL")

    async def scenario(app, pilot):
        await tui.until(pilot, lambda: job.id in app.jobs, what="the job")
        await pilot.press("enter", "b")
        screen = app.screen
        assert isinstance(screen, BlocksScreen) and screen.lora == lora
        await tui.until(pilot, lambda: screen.vector is not None, timeout=120, what="the block layout")
        table = screen.query_one(BlockTable)
        assert table.row_count == len(layout.blocks) + 1 == len(screen.vector.weights)
        assert [str(table.get_row_at(i)[0]) for i in range(3)] == [
            "BASE",
            layout.blocks[0].label,
            layout.blocks[1].label,
        ]
        entry0 = str(screen.query_one("#entry0").render())
        assert "factor on every UNet block" in entry0 and "BASE" in entry0  # both meanings, side by side

        await pilot.press("down", "minus", "minus", "down", "0", "down")
        await pilot.press("enter")
        assert isinstance(app.screen, Ask)
        await pilot.press(*"0.25", "enter")
        assert screen.vector.weights[:4] == [1, 0.8, 0, 0.25]
        assert str(table.get_row_at(1)[1]) == "0.8"
        assert screen.vector.text in str(screen.query_one("#vector-line").render())

        await pilot.press("p")
        assert isinstance(app.screen, Choose)
        await pilot.press("down", "down", "down", "down", "enter")  # NONE, ALL, INALL, MIDALL, OUTALL
        assert screen.vector.text == outall

        full = screen.query_one("#preview-full", Picture)
        weighted = screen.query_one("#preview-vector", Picture)
        await pilot.press("v")  # it says what it renders and for how long; v again cancels it
        await tui.until(
            pilot,
            lambda: "rendering full strength" in str(full.query_one(".picture-text").render()),
            what="the preview's progress",
        )
        await pilot.press("v")
        await tui.until(
            pilot, lambda: screen.rendering is None, timeout=30, what="the preview to be cancelled"
        )
        assert "preview cancelled" in str(weighted.query_one(".picture-text").render()) and full.image is None

        await pilot.press("s", "ctrl+a", "ctrl+k", "3", "enter")  # the previews after it: 3 denoising steps
        assert screen.steps == 3
        await pilot.press("v")
        steps_seen = set()

        def rendered() -> bool:
            if screen._render_step:
                steps_seen.add(screen._render_step)  # "step 2/8": the daemon's own progress
            return full.image is not None and weighted.image is not None

        await tui.until(pilot, rendered, timeout=240, what="both previews")
        assert steps_seen and all(s.startswith("step ") and s.endswith("/3") for s in steps_seen), steps_seen
        label = screen.query_one("#label-vector")
        assert screen.previewed == outall and str(label.render()) == "with the vector"
        await pilot.press("1")  # the vector changes: the picture below is of an earlier one, and says so
        assert "earlier vector" in str(label.render())
        await pilot.press("0")

        await pilot.press("x")
        assert isinstance(app.screen, Confirm)
        await pilot.press("y")
        await tui.until(pilot, lambda: screen.chopped is not None, timeout=120, what="the chopped file")
        chopped = Path(screen.chopped.path)
        assert chopped.is_file() and chopped.stat().st_size == screen.chopped.bytes
        assert chopped.name.endswith("-chop.safetensors")
        assert str(chopped) in str(screen.query_one("#vector-line").render())
        with trained.daemon.client() as c:  # the chopped file keeps only the output blocks
            kept = c.block_layout(str(chopped))
        assert [b.label for b in kept.blocks] == [b.label for b in layout.blocks if b.label.startswith("OUT")]

    tui.run(trained.daemon.connect, scenario)
