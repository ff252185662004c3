"""The queue screen against a real daemon (no workers: jobs stay queued until cancelled)."""

from __future__ import annotations

import pytest

from loradrop.tui.screens.dialogs import Ask, Confirm
from loradrop.tui.screens.job import JobScreen
from loradrop.tui.widgets.jobs_table import JobsTable

pytestmark = pytest.mark.timeout(120)


def test_a_dropped_folder_appears_and_cancel_and_retry_ask_first(start_daemon, dataset, tui):
    daemon = start_daemon("--workers", "0")

    async def scenario(app, pilot):
        table = app.screen.query_one(JobsTable)
        await tui.until(pilot, lambda: app.connected, what="the app to connect")
        assert table.row_count == 0
        dataset(daemon.home / "inbox" / "cats")
        await tui.until(pilot, lambda: table.row_count == 1, what="the dropped folder to appear as a job")
        assert table.cell_text("0001-cats", "name") == "cats"
        assert table.cell_text("0001-cats", "state") == "queued"

        await pilot.press("c")
        assert isinstance(app.screen, Confirm)
        assert "n or esc: no" in str(app.screen.query_one(".dialog-keys").render())  # it says how to answer
        await pilot.press("n")  # changed its mind: nothing happens
        assert not isinstance(app.screen, Confirm)
        await pilot.pause(0.3)
        assert table.cell_text("0001-cats", "state") == "queued"

        await pilot.press("c", "y")
        await tui.until(
            pilot,
            lambda: table.cell_text("0001-cats", "state") == "cancelled",
            what="the job to show cancelled",
        )
        with daemon.client() as c:
            assert c.job("0001-cats").error == "cancelled by request"

        await pilot.press("r")
        assert isinstance(app.screen, Confirm)
        await pilot.press("y")
        await tui.until(
            pilot,
            lambda: table.cell_text("0001-cats", "state") == "queued",
            what="the retried job to be queued again",
        )

        await pilot.press("enter")
        assert isinstance(app.screen, JobScreen) and app.screen.job_id == "0001-cats"
        log = app.screen.query_one("#job-log")
        await tui.until(
            pilot, lambda: any("job cancelled" in line for line in log.lines), what="the job's log"
        )

    tui.run(daemon.connect, scenario)


def test_submit_asks_for_a_folder_in_the_inbox(start_daemon, dataset, tui):
    daemon = start_daemon("--workers", "0", "--quiet-seconds", "600")  # the watcher leaves it to us
    dataset(daemon.home / "inbox" / "dogs")

    async def scenario(app, pilot):
        table = app.screen.query_one(JobsTable)
        await tui.until(pilot, lambda: app.status is not None, what="the app to connect")
        await pilot.press("s")
        assert isinstance(app.screen, Ask)
        assert "enter: OK  ·  esc: cancel" in str(app.screen.query_one(".dialog-keys").render())
        await pilot.press(*"dogs", "enter")
        await tui.until(pilot, lambda: table.row_count == 1, what="the submitted job")
        assert table.selected == "0001-dogs"
        assert table.cell_text("0001-dogs", "state") == "queued"

        await pilot.press("s", *"no-such-folder", "enter")  # refused: said, and the queue is unchanged
        await tui.until(pilot, lambda: app._notifications, what="the refusal to be shown")
        assert "no-such-folder" in str(list(app._notifications)[-1].message)
        assert table.row_count == 1

    tui.run(daemon.connect, scenario)


def test_rows_stay_in_number_order_when_new_jobs_arrive_out_of_order():
    """Jobs the daemon records while the app connects come in events, each fetched in a call of
    its own: the second could be shown above the first, and `↓ enter` on "job 1" opened job 1."""
    import asyncio

    from textual.app import App

    from loradrop.proto.v1 import loradrop_pb2 as pb
    from loradrop.tui.facts import Seen

    class One(App):
        def compose(self):
            yield JobsTable()

    async def scenario():
        app = One()
        async with app.run_test() as pilot:
            table = app.query_one(JobsTable)
            for number, name in ((2, "dogs"), (3, "owls"), (1, "cats")):  # as the calls came back
                job = pb.Job(id=f"000{number}-{name}", number=number, name=name, state=pb.QUEUED)
                table.upsert(job, Seen(), 0.0)
            await pilot.pause()
            assert [table.coordinate_to_cell_key((row, 0)).row_key.value for row in range(3)] == [
                "0001-cats",
                "0002-dogs",
                "0003-owls",
            ]
            assert table.selected == "0001-cats"  # the cursor on the first row, as at every start

    asyncio.run(scenario())
