"""The blocks screen's own lines at the widths a terminal has (the file it edits, the chopped
file's path), its `s` key (the denoising steps of the previews after it), and the daemon's
refusal of a preview over its size and step budget. A real daemon without workers: block
layouts and chops run in its tool worker; previews would need a training worker."""

from __future__ import annotations

import pytest
from textual.geometry import Region

from loradrop.proto.client import ClientError
from loradrop.testing import wait_for
from loradrop.tui.formatting import size_text
from loradrop.tui.screens.blocks import BlocksScreen
from loradrop.tui.screens.dialogs import Ask, Confirm

pytestmark = pytest.mark.timeout(120)
WIDTHS = (80, 100, 120)
# A name as long as a real run's (dataset, network, resized): with the home and the job folder
# around it, the chopped file's path is longer than 100 columns.
NAME = "zkw-cats-v2-lycoris-locon-dim8-conv4-resized.safetensors"


def drawn(widget) -> list[str]:
    """The rows the widget draws, as text (what a terminal of its width shows of it)."""
    rows = widget.render_lines(Region(0, 0, *widget.outer_size))  # padding included
    return ["".join(segment.text for segment in row).rstrip() for row in rows]


def squeezed(text: str) -> str:
    return "".join(text.split())


@pytest.fixture
def lora_job(start_daemon, dataset, lora):
    """A daemon without workers, one queued job and a LoRA file in its outputs."""
    daemon = start_daemon("--workers", "0")
    dataset(daemon.home / "inbox" / "cats")
    with daemon.client() as c:
        job = wait_for(lambda: c.jobs(), what="the dropped folder to become a job")[0]
    return daemon, job, lora(daemon.home / "outputs" / job.id / NAME)


def test_the_title_reads_whole_at_every_width(lora_job, tui):
    """At 80 columns the title ended in a dangling "·": the path after it wrapped into a row the
    title had not got. A line cut at the screen's edge says so with "…"; the path is shown whole,
    wrapped, as it is there to be copied."""
    daemon, job, lora_path = lora_job

    async def scenario(app, pilot):
        await tui.until(pilot, lambda: job.id in app.jobs, what="the job")
        app.push_screen(BlocksScreen(job.id, str(lora_path)))
        screen = app.screen
        await tui.until(pilot, lambda: screen.vector is not None, what="the block layout")
        for width in WIDTHS:
            await pilot.resize_terminal(width, 24)
            await pilot.pause()
            title = drawn(screen.query_one("#blocks-file"))[0]
            assert title.strip().startswith(NAME) and "blocks" in title, (width, title)
            assert title.endswith("pass through") or title.endswith("…"), (
                width,
                title,
            )  # whole, or visibly cut
            path_rows = drawn(screen.query_one("#blocks-path"))
            assert squeezed(str(lora_path)) == squeezed("".join(path_rows)), (width, path_rows)

    tui.run(daemon.connect, scenario)


def test_the_chopped_file_reads_whole_at_every_width(lora_job, tui):
    """The chopped file's path was cut at 100 columns (its line wrapped into a row the vector
    line had not got)."""
    daemon, job, lora_path = lora_job

    async def scenario(app, pilot):
        await tui.until(pilot, lambda: job.id in app.jobs, what="the job")
        app.push_screen(BlocksScreen(job.id, str(lora_path)))
        screen = app.screen
        await tui.until(pilot, lambda: screen.vector is not None, what="the block layout")
        await pilot.press("down", "0", "x")
        assert isinstance(app.screen, Confirm)
        await pilot.press("y")
        await tui.until(pilot, lambda: screen.chopped is not None, timeout=60, what="the chopped file")
        chopped = screen.chopped.path
        assert len(f"chopped (00.0 kB): {chopped}") > 100 - 2  # the case that was cut
        for width in WIDTHS:
            await pilot.resize_terminal(width, 24)
            await pilot.pause()
            rows = drawn(screen.query_one("#vector-line"))
            assert squeezed(f"vector {screen.vector.text}") == squeezed(rows[0]), (width, rows)
            after = squeezed("".join(rows[1:]))
            assert squeezed(chopped) in after and squeezed(size_text(screen.chopped.bytes)) in after, (
                width,
                rows,
            )

    tui.run(daemon.connect, scenario)


def test_s_sets_the_preview_steps_and_refuses_what_is_out_of_range(lora_job, tui):
    daemon, job, lora_path = lora_job

    def said(app) -> str:
        return str(list(app._notifications)[-1].message)

    async def scenario(app, pilot):
        await tui.until(pilot, lambda: job.id in app.jobs, what="the job")
        app.push_screen(BlocksScreen(job.id, str(lora_path)))
        screen = app.screen
        await tui.until(pilot, lambda: screen.vector is not None, what="the block layout")
        assert "s: its steps" in str(
            screen.query_one("#preview-full .picture-text").render()
        )  # the key is named where previews show

        for typed in ("200", "-3", "many"):
            await pilot.press("s")
            assert isinstance(app.screen, Ask) and "1-150" in str(
                app.screen.query_one(".dialog-question").render()
            )
            await pilot.press("ctrl+a", "ctrl+k", *typed, "enter")
            assert screen.steps == 0, typed  # unchanged: still the quick look
            refusal = said(app)
            assert (
                f"'{typed}' is not a step count from 0 to 150" in refusal
                and refusal.count(". ") == 0
                and refusal.endswith(".")
            ), refusal

        await pilot.press("s", "ctrl+a", "ctrl+k", "1", "2", "enter")
        assert screen.steps == 12 and said(app) == "previews render with 12 steps"
        await pilot.press("s", "escape")  # asked and left: it stays
        assert screen.steps == 12
        await pilot.press("s", "ctrl+a", "ctrl+k", "0", "enter")
        assert screen.steps == 0 and "quick look" in said(app)

    tui.run(daemon.connect, scenario)


def test_a_preview_over_the_size_or_step_budget_is_refused_in_one_sentence(lora_job):
    """A preview renders in the training worker between two steps: one of 4096² pixels or 1,000
    steps would hold the job for hours, so the daemon refuses it before any worker sees it."""
    daemon, job, lora_path = lora_job
    over = [  # the request, and the limit its refusal names
        (dict(steps=151), "1 to 150 steps"),
        (dict(prompts=["a zkw thing --w 4096 --h 4096 --s 4"]), "at most 4 megapixels"),
        (dict(prompts=["a zkw thing --w 64 --h 64 --s 1000"]), "at most 150"),
    ]
    with daemon.client() as c:
        for request, limit in over:
            with pytest.raises(ClientError) as refused:
                c.preview(str(lora_path), **request)
            message = str(refused.value)
            assert limit in message and "\n" not in message and message.endswith("."), (request, message)
