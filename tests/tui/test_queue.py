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


def test_on_a_ray_cluster_a_running_job_shows_the_node_it_runs_on():
    """The node comes from the daemon's status (the worker running the job); a local daemon's
    status says no cluster, and its queue has no node column."""
    import asyncio

    from textual.app import App

    from loradrop.proto.v1 import loradrop_pb2 as pb
    from loradrop.tui.facts import Seen

    class One(App):
        def compose(self):
            yield JobsTable()

    running = pb.Job(id="0001-cats", number=1, name="cats", state=pb.RUNNING)
    queued = pb.Job(id="0002-dogs", number=2, name="dogs", state=pb.QUEUED)
    workers = [
        pb.Worker(index=0, device="cuda:0", state="busy", job_id="0001-cats", node="bb02"),
        pb.Worker(index=1, device="cuda:0", state="idle", node="cc03"),
    ]
    cluster = pb.Cluster(
        address="10.0.0.1:6379",
        resource="GPU",
        nodes=[pb.Node(id="bb02", address="10.0.0.2", alive=True, gpus=1, gpus_free=0)],
    )

    async def scenario():
        app = One()
        async with app.run_test() as pilot:
            table = app.query_one(JobsTable)
            table.upsert(running, Seen(), 0.0)
            table.place(pb.StatusReply(workers=[pb.Worker(index=0, device="cuda:0", state="busy")]))
            assert "node" not in table.columns  # a local daemon

            table.place(pb.StatusReply(cluster=cluster, workers=workers))
            table.upsert(queued, Seen(), 0.0)  # a row added after the column
            await pilot.pause()
            assert table.cell_text("0001-cats", "node") == "bb02"
            assert table.cell_text("0002-dogs", "node") == ""

            workers[0].ClearField("job_id")  # the job ended; its worker waits for the next
            table.place(pb.StatusReply(cluster=cluster, workers=workers))
            assert table.cell_text("0001-cats", "node") == ""

    asyncio.run(scenario())
