"""A preview: a LoRA at a block vector's strengths, rendered a denoising step at a time.

Each `advance` is a slice: the running job's adapters (lent at `Control.poll`) are set aside,
the preview's LoRA applied, steps rendered for the time given, and everything put back, so
training between two slices is unaffected (and the pictures do not depend on how they were sliced).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from loradrop.errors import UserError
from loradrop.fsutil import atomic_path

from .data.prompts import SamplePrompt, parse_prompt_line
from .events import Lendable, PreviewProgress
from .lora.apply import apply_lora
from .lora.lorafile import read_lora
from .models.sdxl import Prediction
from .outputs import Outputs, prompts_beside
from .train.precision import Precision
from .train.sampling import Render, preserved_rng

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

PREVIEW_STEPS = 8  # a preview's denoising steps unless the request asks for more (a rough look, quickly)
PREVIEW_BUDGET_S = 300.0  # compute seconds a preview may need on this machine, judged from its first step


class PreviewRender:
    def __init__(
        self,
        session: "Session",
        lora: Path,
        vector: str | None,
        prompts: list[str] | None,
        seed: int,
        model: str | None,
        out_dir: Path,
        steps: int | None,
        progress: Callable[[PreviewProgress], None] | None,
    ):
        self.device, self.vector, self.seed, self.progress = session.device, vector, seed, progress
        self.outputs = Outputs(out_dir, "")
        self.target = session.preview_model(model)
        if not prompts:  # the job's own sample prompts, as its training rendered them
            resolved = prompts_beside(lora)
            prompts = resolved.read_text().splitlines() if resolved.is_file() else []
        parsed = (
            [parse_prompt_line(p, log.warning) for p in prompts] if prompts else [SamplePrompt(prompt="")]
        )
        self.prompts = [dataclasses.replace(p, steps=steps or min(p.steps, PREVIEW_STEPS)) for p in parsed]
        self.lora = read_lora(lora)  # read once: each slice applies it from memory
        self.prediction = Prediction.trained_with(
            self.lora.metadata, self.target.prediction
        )  # as the job sampled
        self.dtype = Precision.for_run_settings("bf16", session.device).weights
        self.tag = hashlib.sha256(f"{lora}|{vector}|{seed}|{prompts}|{steps}".encode()).hexdigest()[:10]
        self.paths: list[Path] = []
        self._render: Render | None = None
        self._judged = False

    @property
    def finished(self) -> bool:
        return len(self.paths) == len(self.prompts)

    def advance(self, seconds: float, check: Callable[[], None], lent: Lendable | None = None) -> None:
        """Render for about `seconds` (one denoising step at least); `check` raises to stop;
        `lent`: the running job's adapters, set aside meanwhile."""
        started = time.monotonic()
        with self._on_model(lent):
            while not self.finished:
                check()
                index = len(self.paths)
                if self._render is None:
                    self._render = Render(
                        self.target,
                        self.prompts[index],
                        device=self.device,
                        dtype=self.dtype,
                        default_seed=self.seed,
                        prediction=self.prediction,
                    )
                before = time.monotonic()
                self._render.step()
                self._judge(time.monotonic() - before)
                if self.progress is not None:
                    self.progress(
                        PreviewProgress(index + 1, len(self.prompts), self._render.done, self._render.total)
                    )
                if self._render.finished:
                    path = self.outputs.preview(self.tag, index)
                    with atomic_path(path) as tmp:
                        self._render.image().save(tmp, format="PNG")
                    self.paths.append(path)
                    self._render = None
                if time.monotonic() - started >= seconds:
                    return

    def _judge(self, step_seconds: float) -> None:
        """After the first step: refuse a preview this machine would take too long to render."""
        if self._judged:
            return
        self._judged = True
        steps = sum(p.steps for p in self.prompts)
        if step_seconds * steps > PREVIEW_BUDGET_S:
            first = self.prompts[0]
            raise UserError(
                f"this preview would take about {step_seconds * steps / 60:.0f} minutes on {self.device} "
                f"({steps} denoising steps at {first.width}x{first.height}); ask for fewer steps or a smaller size (--w, --h)."
            )

    @contextlib.contextmanager
    def _on_model(self, lent: Lendable | None):
        if lent is not None:
            lent.restore()
        try:
            with apply_lora(self.target, self.lora, self.vector), preserved_rng(self.device):
                yield
        finally:
            if lent is not None:
                lent.apply_to()
