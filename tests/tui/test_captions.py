"""The caption screen against a real daemon: a job held for caption review (the tiny tagger
captioned it), its captions edited in place and a tag added to all, then accepted; the files on
disk change, and the job goes on."""

from __future__ import annotations

import shutil

import pytest
from textual.widgets import Input

from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.testing import wait_for
from loradrop.tui.screens.captions import CaptionScreen, retag
from loradrop.tui.screens.dialogs import Ask
from loradrop.tui.widgets.jobs_table import JobsTable

pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_retag_puts_a_tag_first_or_takes_it_out():
    assert retag("1girl, solo", "zkw", "add") == "zkw, 1girl, solo"
    assert retag("1girl, zkw, solo", "zkw", "add") == "zkw, 1girl, solo"
    assert retag("zkw, 1girl, solo", "solo", "remove") == "zkw, 1girl"
    assert retag("", "zkw", "add") == "zkw"


def test_edit_bulk_tag_and_accept_in_the_caption_screen(start_daemon, dataset, tui, homes):
    from loradrop.engine.caption.tiny import make_tiny_tagger

    tagger = make_tiny_tagger(homes().parent / "tagger")
    daemon = start_daemon("--workers", "1", "--captioner", str(tagger))
    staged = dataset(daemon.home.parent / "staging" / "zkw", settings={"review": True, "max_train_steps": 1})
    for caption in staged.glob("img*.txt"):
        caption.unlink()
    folder = daemon.home / "inbox" / "zkw"
    shutil.move(staged, folder)
    with daemon.client() as c:
        job = wait_for(lambda: c.jobs() and c.jobs()[0], what="the job")
        wait_for(
            lambda: c.job(job.id).state == pb.REVIEW,
            timeout=120,
            interval=0.2,
            what=f"job {job.id} to wait for review:\n{daemon.log()}",
        )
    first, second = folder / "img0.txt", folder / "img1.txt"
    tagged = second.read_text().strip()

    async def scenario(app, pilot):
        table = app.screen.query_one(JobsTable)
        await tui.until(
            pilot,
            lambda: table.row_count == 1 and app.jobs[job.id].state == pb.REVIEW,
            what="the job in review",
        )
        assert table.cell_text(job.id, "state") == "review"
        await pilot.press("e")
        screen = app.screen
        assert isinstance(screen, CaptionScreen)
        field = screen.query_one("#caption-text", Input)
        await tui.until(pilot, lambda: len(screen.captions) == 2, what="the dataset's captions")
        assert field.value == first.read_text().strip() and field.value.startswith("1girl")
        await tui.until(
            pilot, lambda: screen.query_one("#caption-picture").png is not None, what="the image's pixels"
        )

        field.value = "a zkw thing on a bench"  # edited in place, saved with enter
        await pilot.press("enter")
        await tui.until(
            pilot, lambda: first.read_text() == "a zkw thing on a bench\n", what="the edit on disk"
        )

        await pilot.press("ctrl+t")  # a tag first in every caption
        assert isinstance(app.screen, Ask)
        await pilot.press("z", "k", "w", "enter")
        await tui.until(pilot, lambda: second.read_text() == f"zkw, {tagged}\n", what="the tag added on disk")
        assert first.read_text() == "zkw, a zkw thing on a bench\n"

        await pilot.press("pagedown")
        await tui.until(pilot, lambda: field.value == f"zkw, {tagged}", what="the second image's caption")
        await pilot.press("ctrl+y")
        await tui.until(
            pilot, lambda: not isinstance(app.screen, CaptionScreen), what="the screen to close on accept"
        )

    tui.run(daemon.connect, scenario)
    with daemon.client() as c:
        assert c.job(job.id).state in (pb.QUEUED, pb.RUNNING, pb.DONE)
