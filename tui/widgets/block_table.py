"""BASE and the LoRA's UNet blocks: tensor counts, where ΔW's energy sits, and the weight of each."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from loradrop.proto.v1 import loradrop_pb2 as pb

from ..formatting import bar, weight_text
from ..vector import BlockVector

BAR = 10


def weight_cell(w: float) -> Text:
    """The weight, marked when it changes the block: dimmed at 0 (removed), bright when scaled."""
    style = "" if w == 1.0 else "dim red" if w == 0.0 else "bold yellow"
    return Text(weight_text(w), style=style, justify="right")


class BlockTable(DataTable):
    def __init__(self, *, id: str | None = None):
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.vector: BlockVector | None = None

    def on_mount(self) -> None:
        self.add_column("entry", key="label")
        self.add_column("weight", key="weight")
        self.add_column("tensors", key="tensors")
        self.add_column("energy ‖ΔW‖", key="energy")
        self.add_column("share", key="share")

    def load(self, layout: pb.BlockLayoutReply, vector: BlockVector) -> None:
        self.clear()
        self.vector = vector
        top = max((b.energy for b in layout.blocks), default=0.0)
        self.add_row(
            "BASE", weight_cell(vector.weights[0]), str(layout.pass_through), "(text encoders)", "", key="0"
        )
        for i, b in enumerate(layout.blocks, start=1):
            self.add_row(
                b.label,
                weight_cell(vector.weights[i]),
                str(b.tensors),
                bar(b.energy / top if top else 0.0, BAR),
                f"{100 * b.share:.1f}%",
                key=str(i),
            )

    @property
    def selected(self) -> int:
        """The vector entry under the cursor (0: BASE)."""
        return self.cursor_row

    def show_weight(self, index: int) -> None:
        self.update_cell(str(index), "weight", weight_cell(self.vector.weights[index]))

    def show_all(self) -> None:
        for i in range(len(self.vector.weights)):
            self.show_weight(i)
