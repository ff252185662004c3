"""A run's files: step LoRAs, the final one and the training state, written off the training thread.

The saver owns the background writer, the file layout of the network's flat payload, the file
names (engine/outputs.py) and the state's cadence: the full training state (fp32 network and
optimizer: ~1.4 GB at SDXL size) goes with a step file at most every `state_interval_s`, and always
when a job stops or ends. A resume from an older state retrains the steps since, to the same
weights (every step is a pure function of the state).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from loradrop.errors import UserError

from .. import tensorfile
from ..events import Artifact, Emit, Log
from ..lora.lorafile import save_lora_payload
from ..outputs import Outputs
from ..recipe import Recipe
from . import checkpoints, metadata
from .network import LoConNetwork
from .precision import SAVE_DTYPES

STATE_INTERVAL_S = 30.0


def diverged(what: str, recipe: Recipe) -> str:
    """The one sentence for a run whose numbers left the finite range (kohya: "NaN detected")."""
    return (
        f"training diverged: {what} (NaN detected); lower the learning rate (unet_lr {recipe.unet_lr:g}, "
        f"text_encoder_lr {recipe.text_encoder_lr:g}) or keep max_grad_norm on, and retry the job."
    )


class Saver:
    def __init__(
        self,
        network: LoConNetwork,
        optimizer: torch.optim.Optimizer,
        outputs: Outputs,
        recipe: Recipe,
        meta: dict[str, str],
        *,
        fingerprint: str,
        epoch_of: Callable[[int], int],
        emit: Emit,
        state_interval_s: float = STATE_INTERVAL_S,
    ):
        self.network, self.optimizer, self.outputs, self.recipe, self.meta = (
            network,
            optimizer,
            outputs,
            recipe,
            meta,
        )
        self.fingerprint, self.epoch_of, self.emit, self.state_interval_s = (
            fingerprint,
            epoch_of,
            emit,
            state_interval_s,
        )
        self.dtype = SAVE_DTYPES[recipe.save_precision]
        self.layout = tensorfile.Layout({k: (self.dtype, network.shapes[k]) for k in network.keys})
        assert self.layout.order == network.keys  # the flat buffer is the file's payload
        self.writer = checkpoints.BackgroundWriter()
        self.step_files: list[Path] = []
        self._last_state = -math.inf

    def resume(self) -> int:
        """The updates already done by the saved state this run may continue from (0: none)."""
        path = self.outputs.state
        if not path.exists():
            return 0
        tensors, info = checkpoints.read_state(path)
        if info.get("fingerprint") != self.fingerprint:
            self.emit(Log(f"{path} was saved with another recipe or dataset; starting over", "warning"))
            return 0
        step = checkpoints.restore_state(self.network, self.optimizer, tensors, info)
        self.emit(Log(f"resuming after step {step} from {path}"))
        return step

    def step_file(self, step: int) -> Path:
        path = self._save(step, self.outputs.step_file(step), "step")
        self.step_files.append(path)
        return path

    def final(self, step: int) -> Path:
        path = self._save(step, self.outputs.final, "final")
        self.writer.flush()
        return path

    def state(self, step: int) -> None:
        """The full training state after `step`, coalesced with a save still waiting."""
        self._last_state = time.monotonic()
        tensors, info = checkpoints.capture_state(
            self.network, self.optimizer, step=step, extra={"fingerprint": self.fingerprint}
        )
        path = self.outputs.state
        self.writer.submit_state(lambda: checkpoints.write_state(path, tensors, info))

    def close(self) -> None:
        """What was submitted reaches the disk (a writer error is raised here)."""
        self.writer.close()

    def _save(self, step: int, path: Path, kind: str) -> Path:
        payload = self.network.snapshot(self.dtype)
        if not bool(torch.isfinite(payload).all()):  # a file with inf or NaN in it is never written
            raise UserError(
                diverged(
                    f"the weights after step {step} hold inf or NaN in {self.recipe.save_precision}",
                    self.recipe,
                )
            )
        file_meta = metadata.at_save(
            self.meta, self.recipe, step=step, epoch=self.epoch_of(step), title=path.stem
        )

        def write() -> None:
            save_lora_payload(path, self.layout, payload, file_meta)
            self.emit(Artifact.of(path, kind, step))

        self.writer.submit(write)
        if kind == "final" or time.monotonic() - self._last_state >= self.state_interval_s:
            self.state(step)
        return path
