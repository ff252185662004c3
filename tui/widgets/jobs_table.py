"""The queue: one row per job, updated in place as progress and state events arrive."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import DataTable

from loradrop.proto.v1 import loradrop_pb2 as pb

from ..facts import STEP_WIDTH, Seen, avg_loss, eta_text, steps_text
from ..formatting import state_text

# (label, key, width): fixed widths, so rows updated many times a second never shift the table;
# the name takes its longest value.
COLUMNS = (
    ("#", "number", 4),
    ("name", "name", None),
    ("state", "state", 9),
    ("step", "step", STEP_WIDTH),
    ("avg loss", "loss", 8),
    ("ETA", "eta", 8),
)
NODE_WIDTH = 10  # a node's short id


class JobsTable(DataTable):
    # enter opens the job from here, the widget with focus, so it runs after the keys before it
    # (a DataTable's own enter only posts a message, which a screen handles later)
    BINDINGS = [Binding("enter", "screen.open", "open")]

    def __init__(self, *, id: str | None = None):
        super().__init__(id=id)
        self.nodes: dict[str, str] = {}  # job id -> the cluster node that runs it

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        for label, key, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    def upsert(self, job: pb.Job, seen: Seen, now: float) -> None:
        loss = avg_loss(job, seen)
        cells = {
            "number": str(job.number),
            "name": job.name,
            "state": state_text(job.state),
            "step": steps_text(job, seen),
            "loss": "" if loss is None else f"{loss:.4f}",
            "eta": eta_text(job, seen, now),
        }
        if "node" in self.columns:
            cells["node"] = self.nodes.get(job.id, "")
        if job.id in self.rows:
            for key, value in cells.items():
                self.update_cell(job.id, key, value)
        else:
            # New jobs of one moment (the daemon's inbox, read while the app connects) are each
            # fetched in a call of their own and can arrive out of order: the rows stay in number
            # order, as `loradrop jobs` lists them; the cursor keeps its row (the first, at start).
            self.add_row(*cells.values(), key=job.id)
            self.sort("number", key=int)

    def place(self, status: pb.StatusReply) -> None:
        """Where each running job runs, from the daemon's status (its workers' nodes). The column
        comes with the first status of a daemon on a Ray cluster; a local daemon's queue has none."""
        if not status.cluster.address:
            return
        if "node" not in self.columns:
            self.add_column("node", key="node", width=NODE_WIDTH, default="")
        self.nodes = {w.job_id: w.node for w in status.workers if w.job_id}
        for row in self.rows:
            self.update_cell(row, "node", self.nodes.get(row.value, ""))

    def tick(self, job: pb.Job, seen: Seen, now: float) -> None:
        """The ETA, counted down between steps."""
        if job.id in self.rows:
            self.update_cell(job.id, "eta", eta_text(job, seen, now))

    @property
    def selected(self) -> str | None:
        """The id of the job under the cursor."""
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def select(self, job_id: str) -> None:
        self.move_cursor(row=self.get_row_index(job_id))

    def cell_text(self, job_id: str, column: str) -> str:
        return str(self.get_cell(job_id, column))
