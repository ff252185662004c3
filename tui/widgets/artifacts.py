"""A job's files: kind, size and name; the full path of the one under the cursor below."""

from __future__ import annotations

import os

from textual.widgets import DataTable

from loradrop.proto.v1 import loradrop_pb2 as pb

from ..formatting import size_text

# LoRA files first (what a person came for), then the rest by name.
KIND_ORDER = {"chopped": 0, "resized": 1, "final": 2, "step": 3, "sample": 5, "preview": 6}


class ArtifactsTable(DataTable):
    def __init__(self, *, id: str | None = None):
        super().__init__(id=id, cursor_type="row")
        self.artifacts: dict[str, pb.Artifact] = {}

    def on_mount(self) -> None:
        self.add_column("kind", key="kind")
        self.add_column("size", key="size")
        self.add_column("file", key="file")

    def load(self, artifacts: list[pb.Artifact]) -> None:
        keep = self.selected.path if self.selected else None
        self.clear()
        self.artifacts = {}
        for a in sorted(artifacts, key=lambda a: (KIND_ORDER.get(a.kind, 4), a.path)):
            self.artifacts[a.path] = a
            self.add_row(a.kind, size_text(a.bytes), os.path.basename(a.path), key=a.path)
        if keep in self.artifacts:
            self.move_cursor(row=self.get_row_index(keep))

    @property
    def selected(self) -> pb.Artifact | None:
        if not self.row_count:
            return None
        return self.artifacts.get(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)
