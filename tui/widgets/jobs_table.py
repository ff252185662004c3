"""The queue: one row per job, updated in place as progress and state events arrive."""

from __future__ import annotations

from textual.widgets import DataTable

from loradrop.proto.v1 import loradrop_pb2 as pb

from ..formatting import eta_text, loss_text, state_text, step_text

# (label, key, width): fixed widths, so rows updated many times a second never shift the table;
# the name takes its longest value.
COLUMNS = (("#", "number", 4), ("name", "name", None), ("state", "state", 9), ("step", "step", 11), ("loss", "loss", 7), ("ETA", "eta", 8))


class JobsTable(DataTable):
    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        for label, key, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    def upsert(self, job: pb.Job) -> None:
        cells = {
            "number": str(job.number),
            "name": job.name,
            "state": state_text(job.state),
            "step": step_text(job),
            "loss": loss_text(job.progress) if job.HasField("progress") else "",
            "eta": eta_text(job),
        }
        if job.id in self.rows:
            for key, value in cells.items():
                self.update_cell(job.id, key, value)
        else:
            self.add_row(*cells.values(), key=job.id)

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
