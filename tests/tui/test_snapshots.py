"""The screens' layouts at 80x24 with half-cell pictures, as SVG screenshots compared with the
committed ones in snapshots/. After an intended change, rewrite them with
`UPDATE_SNAPSHOTS=1 pytest tests/tui/test_snapshots.py` and look at the new files.

The app runs against a real daemon (no workers, so nothing changes under it). What a run cannot
repeat is replaced before comparing, with text of the same width: the temporary home's name, the
clock in log lines, and the SVG's content hash. The job screen's progress and samples are events
handed to it as its feed would; the pictures themselves come from the daemon (GetSample).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.testing import wait_for
from loradrop.tui.images import Picture
from loradrop.tui.messages import EventBatch
from loradrop.tui.screens.blocks import BlocksScreen
from loradrop.tui.widgets.jobs_table import JobsTable

pytestmark = pytest.mark.timeout(120)
SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("UPDATE_SNAPSHOTS") == "1"


def normalise(svg: str) -> str:
    svg = re.sub(r"terminal-\d+", "terminal", svg)
    svg = re.sub(r"ldt-[A-Za-z0-9_]{1,8}", lambda m: "ldt-" + "X" * (len(m.group()) - 4), svg)
    return re.sub(r"\b\d\d:\d\d:\d\d\b", "00:00:00", svg)


async def check(app, pilot, name: str, tmp_path: Path, settle: float = 3.0) -> None:
    """Compare the screen with the stored snapshot, giving it up to `settle` seconds to draw
    what the widgets already hold (a table repaints its new rows on the next refresh)."""
    path = SNAPSHOTS / f"{name}.svg"
    expected = path.read_text() if path.exists() else None
    deadline = time.monotonic() + settle
    await pilot.pause()
    actual = normalise(app.export_screenshot())
    while actual != expected and not UPDATE and time.monotonic() < deadline:
        await pilot.pause(0.1)
        actual = normalise(app.export_screenshot())
    if UPDATE or expected is None:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(actual)
        if not UPDATE:
            pytest.fail(f"no snapshot {path.name} yet: written now, look at it and commit it")
        return
    if actual != expected:
        (tmp_path / path.name).write_text(actual)
        pytest.fail(
            f"{name} differs from {path}; the new screenshot is {tmp_path / path.name} (UPDATE_SNAPSHOTS=1 to accept it)"
        )


def coloured(path: Path, left: tuple, right: tuple) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 64), left)
    image.paste(right, (32, 0, 64, 64))
    image.save(path)
    return path


def test_queue_and_job_log(start_daemon, dataset, tui, tmp_path):
    daemon = start_daemon("--workers", "0")
    for name in ("cats", "dogs", "owls"):
        dataset(daemon.home / "inbox" / name)
    with daemon.client() as c:
        wait_for(lambda: len(c.jobs()) == 3, what="three jobs")
        c.cancel("0002-dogs")

    async def scenario(app, pilot):
        table = app.screen.query_one(JobsTable)
        await tui.until(
            pilot,
            lambda: table.row_count == 3 and table.cell_text("0002-dogs", "state") == "cancelled",
            what="the queue",
        )
        await tui.until(
            pilot,
            lambda: "workers" in str(app.screen.query_one("#daemon-line").render()),
            what="the daemon's line",
        )
        await check(app, pilot, "queue", tmp_path)
        await pilot.press("down", "enter")
        log = app.screen.query_one("#job-log")
        await tui.until(pilot, lambda: len(log.lines) == 2, what="the job's log")
        await check(app, pilot, "job-log", tmp_path)

    tui.run(daemon.connect, scenario)


def test_job_samples_and_blocks(start_daemon, dataset, tui, lora, tmp_path):
    daemon = start_daemon("--workers", "0")
    dataset(daemon.home / "inbox" / "cats")
    out = daemon.home / "outputs" / "0001-cats"
    out.mkdir(parents=True)
    lora_path = lora(out / "cats.safetensors")
    samples = [
        coloured(out / "samples" / f"s{step}_p{p}.png", left, right)
        for step, p, left, right in (
            (2, 0, (255, 0, 0), (0, 0, 255)),
            (2, 1, (0, 160, 0), (255, 255, 0)),
            (4, 0, (255, 128, 0), (0, 200, 200)),
            (4, 1, (255, 255, 255), (128, 0, 128)),
        )
    ]
    events = [
        pb.Event(
            seq=10 + i,
            job_id="0001-cats",
            kind="progress",
            progress=pb.Progress(
                stage="train", done=i, total=4, loss=loss, avg_loss=loss + 0.01, eta_s=4.0 - i
            ),
        )
        for i, loss in enumerate((0.31, 0.22, 0.26, 0.12), start=1)
    ]
    events += [
        pb.Event(
            seq=20 + i,
            job_id="0001-cats",
            kind="sample",
            sample=pb.SampleReady(
                path=str(path), step=2 + 2 * (i // 2), prompt_index=i % 2, prompt=f"prompt {i % 2}"
            ),
        )
        for i, path in enumerate(samples)
    ]

    async def scenario(app, pilot):
        table = app.screen.query_one(JobsTable)
        await tui.until(pilot, lambda: table.row_count == 1, what="the job")
        await pilot.press("enter")
        screen = app.screen
        log = screen.query_one("#job-log")
        await tui.until(pilot, lambda: len(log.lines) == 1, what="the job's log")
        batch = EventBatch(screen.post_message)
        for event in events:
            batch.put(event)
        await pilot.press("g")
        picture = screen.query_one("#sample-picture", Picture)
        await tui.until(pilot, lambda: picture.image is not None, what="the newest sample")
        await pilot.pause(0.2)
        await check(app, pilot, "job-samples", tmp_path)

        app.push_screen(BlocksScreen("0001-cats", str(lora_path)))
        blocks = app.screen
        await tui.until(pilot, lambda: blocks.vector is not None, what="the block layout")
        await pilot.press("down", "down", "0", "down", "minus")
        await pilot.pause(0.2)
        await check(app, pilot, "blocks", tmp_path)

    tui.run(daemon.connect, scenario)
