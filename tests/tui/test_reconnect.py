"""A daemon restart: the TUI says it is reconnecting, comes back, and its streams resume by
sequence number, with no line missing and none twice."""

from __future__ import annotations

import re

import pytest

from loradrop.commands.logs import event_line
from loradrop.tui.screens.job import JobScreen
from loradrop.tui.widgets.jobs_table import JobsTable

pytestmark = pytest.mark.timeout(120)
SEQ = re.compile(r"\[(\d+)\]")


def test_the_tui_survives_a_daemon_restart(start_daemon, dataset, tui):
    first = start_daemon("--workers", "0")
    dataset(first.home / "inbox" / "cats")

    async def scenario(app, pilot):
        table = app.screen.query_one(JobsTable)
        await tui.until(pilot, lambda: table.row_count == 1, what="the job")
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, JobScreen)
        log = screen.query_one("#job-log")
        await tui.until(pilot, lambda: log.lines, what="the job's first log line")

        first.stop()
        await tui.until(
            pilot, lambda: "reconnecting" in app.sub_title, what="the app to say it is reconnecting"
        )
        assert not app.connected

        second = start_daemon("--workers", "0", home=first.home)
        await tui.until(
            pilot, lambda: app.connected and "connected" in app.sub_title, what="the app to reconnect"
        )
        with second.client() as c:
            c.cancel("0001-cats")  # a new event, after the restart
            events = list(c.events("0001-cats", follow=False))
        await tui.until(
            pilot,
            lambda: any("job cancelled" in line for line in log.lines),
            what="the event after the restart",
        )
        await tui.until(
            pilot, lambda: table.cell_text("0001-cats", "state") == "cancelled", what="the queue to show it"
        )

        seqs = [int(SEQ.search(line).group(1)) for line in log.lines]
        assert seqs == sorted(set(seqs)), f"a line came twice or out of order: {log.lines}"
        expected = [event_line(e) for e in events if e.WhichOneof("body") != "progress"]
        assert list(log.lines) == expected
        assert log.received == len(expected)

    tui.run(first.connect, scenario)


def test_the_banner_says_why_as_of_now_and_how_to_start_this_home(start_daemon, tui):
    daemon = start_daemon("--workers", "0")
    socket = daemon.home / "daemon.sock"

    async def scenario(app, pilot):
        line = app.screen.query_one("#daemon-line")
        await tui.until(pilot, lambda: app.connected and app.status is not None, what="the app to connect")
        daemon.stop()
        expected = f"cannot reach the daemon at {socket} (no such socket); start one with `loradrop daemon --home {daemon.home}`"
        # The first word from the stopping daemon ("it is stopping") gives way to what is true once it has gone.
        await tui.until(
            pilot,
            lambda: expected in str(line.render()),
            timeout=20,
            what=f"the banner to say the socket has gone: {line.render()}",
        )
        assert "reconnecting" in str(line.render()) and "stopping" not in str(line.render())

    tui.run(daemon.connect, scenario)
