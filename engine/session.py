"""A worker's engine: the device, and the base model kept loaded from one job to the next.

The daemon's worker process (spawned, the only process that imports torch) holds one `Session`
for its life and calls `run` for each job (engine/job.py) and `start_preview` for each preview
(engine/preview.py). During a job a preview renders on the job's loaded model, between two
training steps, with the job's adapters set aside (the loop lends them at `Control.poll`).
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .events import Control, Emit, PreviewProgress
from .jobspec import JobResult, JobSpec

if TYPE_CHECKING:
    from .models.sdxl import SDXL
    from .preview import PreviewRender


class Session:
    def __init__(self, device: str | None = None):
        from .train.distributed import World, pick_device

        self.device = pick_device(device, World())
        self._model: SDXL | None = None
        self._model_key: tuple | None = None
        self.in_job = False  # a job runs now: previews use its loaded model

    def model(self, path: str | None, mixed_precision: str = "bf16", no_half_vae: bool = True) -> "SDXL":
        """The loaded model for `path` (None: the default twin); loads only when it changed."""
        import torch

        from .models.sdxl import load_sdxl
        from .models.tiny import default_model_path
        from .train.precision import Precision

        source = str(Path(path).expanduser().resolve()) if path else str(default_model_path())
        weights = Precision.for_run_settings(mixed_precision, self.device).weights
        vae = torch.float32 if no_half_vae else weights
        key = (source, weights, vae)
        if key != self._model_key:
            self._model = self._model_key = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            model = load_sdxl(source, dtype=weights, vae_dtype=vae)
            for part in ("unet", "te1", "te2", "vae"):
                model.component(part).to(self.device)
            self._model, self._model_key = model, key
        return self._model

    def preview_model(self, path: str | None) -> "SDXL":
        """The model a preview renders on: during a job, the job's; else `path`'s."""
        return self._model if self.in_job and self._model is not None else self.model(path)

    def run(self, spec: JobSpec, emit: Emit, control: Control | None = None) -> JobResult:
        from .job import run_job

        self.in_job = True
        try:
            return run_job(self, spec, emit, control)
        finally:
            self.in_job = False

    def start_preview(
        self,
        lora: Path,
        vector: str | None,
        prompts: list[str] | None,
        seed: int,
        model: str | None,
        out_dir: Path,
        *,
        steps: int | None = None,
        progress: Callable[[PreviewProgress], None] | None = None,
    ) -> "PreviewRender":
        """A preview to render in slices (`PreviewRender.advance`): prompt lines in kohya's sample
        syntax (none: the prompts the LoRA's job sampled during training, seeds included),
        `lora` applied at the block vector's strengths (the Block Weight loader's meaning: entry
        0 is BASE, the text encoders). `steps` (default: at most PREVIEW_STEPS) sets every
        prompt's denoising steps."""
        from .preview import PreviewRender

        return PreviewRender(self, lora, vector, prompts, seed, model, out_dir, steps, progress)

    def preview(
        self,
        lora: Path,
        vector: str | None,
        prompts: list[str] | None,
        seed: int,
        model: str | None,
        out_dir: Path,
        steps: int | None = None,
    ) -> list[Path]:
        """A whole preview at once (see `start_preview`); the images' paths."""
        render = self.start_preview(lora, vector, prompts, seed, model, out_dir, steps=steps)
        render.advance(math.inf, lambda: None)
        return render.paths
