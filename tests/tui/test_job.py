"""The job screen against a real daemon: a job training live, and a finished job's samples."""

from __future__ import annotations

import pytest

from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.tui.images import Picture
from loradrop.tui.screens.job import JobScreen
from loradrop.tui.widgets.artifacts import ArtifactsTable
from loradrop.tui.widgets.gallery import Gallery
from loradrop.tui.widgets.jobs_table import JobsTable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def colours(picture: Picture) -> tuple[tuple, tuple]:
    """The colours at the middle of the left and right halves of the picture shown."""
    image = picture.image
    w, h = image.size
    return image.getpixel((w // 4, h // 2)), image.getpixel((3 * w // 4, h // 2))


def test_a_job_trains_live_in_its_screen(start_daemon, dataset, tui):
    daemon = start_daemon()
    dataset(daemon.home / "inbox" / "zkw")  # 4 steps, no samples (the gallery is tested on a finished job)

    async def scenario(app, pilot):
        table = app.screen.query_one(JobsTable)
        await tui.until(pilot, lambda: table.row_count == 1, what="the job in the queue")
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, JobScreen)
        log = screen.query_one("#job-log")
        await tui.until(
            pilot, lambda: app.jobs["0001-zkw"].state == pb.RUNNING, timeout=120, what="the job to run"
        )
        seen = len(log.lines)
        await tui.until(
            pilot, lambda: len(log.lines) > seen, timeout=120, what="the log to grow while it trains"
        )
        await tui.until(
            pilot,
            lambda: len(screen.query_one("#loss").points) >= 2,
            timeout=300,
            what="two losses on the plot",
        )
        assert table.cell_text("0001-zkw", "state") == "running"
        await tui.until(
            pilot, lambda: app.jobs["0001-zkw"].state == pb.DONE, timeout=300, what="the job to finish"
        )
        bar = screen.query_one("#job-progress")
        assert sorted(screen.query_one("#loss").points) == [1, 2, 3, 4]
        assert bar.total and bar.progress == bar.total
        await tui.until(pilot, lambda: len(log.lines) == log.received, what="every line received in the log")
        assert log.received > seen
        title = str(
            screen.query_one("#job-title").render()
        )  # what a done job is: done, its final loss, its file
        assert "done" in title and "4 steps" in title and "avg loss" in title and "resize" not in title, title
        assert table.cell_text("0001-zkw", "step") == "4/4" and table.cell_text("0001-zkw", "loss")

        await pilot.press("a")
        files = screen.query_one(ArtifactsTable)
        job = app.jobs["0001-zkw"]
        await tui.until(
            pilot, lambda: job.resized in files.artifacts, timeout=30, what="the resized LoRA among the files"
        )
        assert files.artifacts[job.final].bytes > 0 and files.artifacts[job.final].kind == "final"
        assert (
            str(files.get_row(job.resized)[0]) == "resized"
        )  # LoRA files first, not buried under the step files

    tui.run(daemon.connect, scenario)


def test_the_gallery_moves_by_step_and_prompt_and_plays_the_montage(trained, tui):
    job = trained.job
    older, newest = sorted({s.step for s in trained.samples})[-2:]

    async def scenario(app, pilot):
        await tui.until(pilot, lambda: job.id in app.jobs, what="the job")
        await pilot.press("enter", "g")
        screen = app.screen
        gallery = screen.query_one(Gallery)
        picture = screen.query_one("#sample-picture", Picture)

        async def shows(step: int, prompt: int) -> None:
            expected = trained.colours(step, prompt)
            await tui.until(
                pilot,
                lambda: picture.image is not None and colours(picture) == expected,
                what=f"the sample of step {step}, prompt {prompt}",
            )

        await shows(newest, 0)  # newest first
        await pilot.press("left")
        await shows(older, 0)
        await pilot.press("down")
        await shows(older, 1)
        await pilot.press("right", "right")  # stops at the newest
        await shows(newest, 1)

        await pilot.press("space")  # the montage: prompt 1 over the steps, oldest first, looping
        assert gallery.playing
        frames = []
        for _ in range(30):  # 3 s at 4 frames a second: round the two frames several times
            await pilot.pause(0.1)
            frames.append(colours(picture))
        shown = [c for i, c in enumerate(frames) if i == 0 or c != frames[i - 1]]
        assert set(shown) == {trained.colours(older, 1), trained.colours(newest, 1)} and len(shown) >= 4, (
            shown
        )
        await pilot.press("space")
        assert not gallery.playing

    tui.run(trained.daemon.connect, scenario)


def test_with_pictures_off_the_gallery_names_the_sample(trained, tui):
    newest = max(trained.samples, key=lambda s: (s.step, -s.prompt_index))

    async def scenario(app, pilot):
        await tui.until(pilot, lambda: trained.job.id in app.jobs, what="the job")
        await pilot.press("enter", "g")
        picture = app.screen.query_one("#sample-picture", Picture)
        await tui.until(pilot, lambda: picture.image is not None, what="the newest sample")
        assert not picture.query(".picture-image")  # no image widget at all
        assert newest.path in str(picture.query_one(".picture-text").render())

    tui.run(trained.daemon.connect, scenario, protocol="none")
