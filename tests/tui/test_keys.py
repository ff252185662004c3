"""Keys typed ahead (sent in one write, as tmux send-keys or a slow ssh link delivers them): each
acts on the state the key before it left, on the queue, across screens and on the blocks screen."""

from __future__ import annotations

import pytest
from textual.widgets import TabbedContent

from loradrop.testing import wait_for
from loradrop.tui.screens.blocks import BlocksScreen
from loradrop.tui.screens.dialogs import Ask
from loradrop.tui.screens.job import JobScreen
from loradrop.tui.screens.queue import QueueScreen
from loradrop.tui.widgets.block_table import BlockTable
from loradrop.tui.widgets.jobs_table import JobsTable

pytestmark = pytest.mark.timeout(120)


def test_keys_sent_together_act_in_order(start_daemon, dataset, tui, lora):
    daemon = start_daemon("--workers", "0", "--quiet-seconds", "600")
    for name in ("cats", "dogs", "owls"):
        dataset(daemon.home / "inbox" / name)
    with daemon.client() as c:
        for name in ("cats", "dogs", "owls"):
            c.submit(name)
        wait_for(lambda: len(c.jobs()) == 3, what="three jobs")
    lora_path = lora(daemon.home / "outputs" / "0002-dogs" / "dogs.safetensors")

    async def scenario(app, pilot):
        table = app.screen.query_one(JobsTable)
        await tui.until(pilot, lambda: table.row_count == 3, what="the queue")
        assert table.selected == "0001-cats"

        await tui.type_ahead(pilot, "down", "enter")  # the row below, then open it
        assert isinstance(app.screen, JobScreen) and app.screen.job_id == "0002-dogs"

        await tui.type_ahead(
            pilot, "escape", "down", "enter", "a"
        )  # back, the next row, open it, its files tab
        assert isinstance(app.screen, JobScreen) and app.screen.job_id == "0003-owls"
        assert app.screen.query_one(TabbedContent).active == "artifacts"

        await tui.type_ahead(pilot, "escape", "up", "up", "c", "y")  # the first job, cancel it, yes
        assert isinstance(app.screen, QueueScreen)
        await tui.until(
            pilot,
            lambda: table.cell_text("0001-cats", "state") == "cancelled",
            what="the first job cancelled",
        )
        assert [table.cell_text(j, "state") for j in ("0002-dogs", "0003-owls")] == ["queued", "queued"]

        await tui.type_ahead(pilot, "s", *"owls", "enter")  # a dialog, typed into at once
        await tui.until(pilot, lambda: app._notifications, what="the answer to the submit")
        assert not isinstance(app.screen, Ask)
        refusal = str(
            list(app._notifications)[-1].message
        )  # owls is queued already: the daemon says as which job
        assert "0003-owls" in refusal and table.row_count == 3, refusal

        app.push_screen(BlocksScreen("0002-dogs", str(lora_path)))
        blocks = app.screen
        await tui.until(pilot, lambda: blocks.vector is not None, what="the block layout")
        await tui.type_ahead(pilot, "down", "left", "up", "right", "right", "down", "down", "0")
        assert blocks.vector.weights[:3] == [1.2, 0.9, 0]
        assert blocks.query_one(BlockTable).selected == 2

    tui.run(daemon.connect, scenario)
