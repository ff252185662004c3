"""One job, start to finish: scan → cache latents → train → samples → resize → analyse → chop.

This is the engine's face to the daemon. The daemon's worker process (spawned, the only process
that imports torch) holds one `Session`, which keeps base models loaded between jobs, and calls
`Session.run(spec, emit, control)` for each job. Everything the job does is reported through
`emit(kind, payload)`; the worker forwards those events to the server, which numbers and stores them.

Event kinds and payloads (plain JSON-able dicts):
  "log"       {"level": "info"|"warning"|"error", "text": str}
  "stage"     {"stage": "scan"|"cache"|"train"|"resize"|"analyze"|"chop"|"done"}
  "progress"  {"stage": str, "done": int, "total": int, "loss": float|None, "avg_loss": float|None,
               "lr_unet": float|None, "lr_te": float|None, "rate": float|None (units/s),
               "eta_s": float|None}
  "sample"    {"path": str, "step": int, "prompt_index": int, "prompt": str}
  "artifact"  {"path": str, "kind": "step"|"final"|"resized"|"chopped"|"recipe"|"analysis",
               "bytes": int, "step": int|None}

`control` lets the daemon steer a running job. The training loop calls `control.poll()` between
optimizer steps; it returns the set of requests that arrived ("save", "sample") and raises
`Cancelled` once the job has been cancelled. `poll` is also where the worker may service other
work that needs the loaded model (previews), so it should stay cheap when nothing is pending.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from .models.sdxl import SDXL

Emit = Callable[[str, dict[str, Any]], None]


class Cancelled(Exception):
    """Raised by `Control.poll` when the job was cancelled; the job stops at a step boundary."""


class Control(Protocol):
    def poll(self) -> set[str]: ...


class NoControl:
    """For offline runs (the `train` command): nothing ever asks anything."""

    def poll(self) -> set[str]:
        return set()


@dataclass
class JobSpec:
    job_id: str
    name: str  # the LoRA's output name (file stem)
    dataset: Path
    out_dir: Path  # <home>/outputs/<job-id>/: everything the job writes goes here
    recipe: dict[str, Any]  # the frozen, resolved Recipe as a dict
    model: str | None = None  # base checkpoint; None = the tiny twin
    block_vector: str | None = None  # chop vector; None = no chop stage
    cache_dir: Path | None = None  # latent cache root (outside the dataset)
    resume: bool = True  # continue from the last full checkpoint in out_dir when there is one


@dataclass
class JobResult:
    final: Path | None = None
    resized: Path | None = None
    chopped: Path | None = None
    samples: list[Path] = field(default_factory=list)
    steps_done: int = 0


class Session:
    """A worker's engine: the device, and the base model kept loaded from one job to the next."""

    def __init__(self, device: str | None = None):
        from .train.distributed import World, pick_device

        self.device = pick_device(device, World())
        self._model: SDXL | None = None
        self._model_key: tuple | None = None
        self._training = None  # the LoConNetwork of the job running now, if any

    # ---------------------------------------------------------------- the base model

    def model(self, path: str | None, mixed_precision: str = "bf16", no_half_vae: bool = True) -> "SDXL":
        """The loaded model for `path` (None: the tiny twin); loads only when it changed."""
        import torch

        from .models.sdxl import load_sdxl
        from .models.tiny import default_model_path
        from .train.loop import Precision

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

    # ---------------------------------------------------------------- one job

    def run(self, spec: JobSpec, emit: Emit, control: Control | None = None) -> JobResult:
        from loradrop.fsutil import atomic_write_text

        from .data.dataset import scan
        from .lora.blocks import energy, suggest
        from .lora.chop import chop
        from .lora.resize import resize
        from .models.hashes import model_hashes
        from .recipe import Recipe
        from .train.loop import train

        recipe = Recipe.from_mapping({**spec.recipe, "output_name": spec.name}, source=f"job {spec.job_id}")
        out = spec.out_dir
        out.mkdir(parents=True, exist_ok=True)
        recipe_path = out / "recipe.toml"
        atomic_write_text(recipe_path, recipe.to_toml())
        emit("artifact", {"path": str(recipe_path), "kind": "recipe", "bytes": recipe_path.stat().st_size, "step": None})

        emit("stage", {"stage": "scan"})
        dataset = scan(spec.dataset, recipe)
        model = self.model(spec.model, recipe.mixed_precision, recipe.no_half_vae)
        base = model.source
        cache_dir = spec.cache_dir or _default_cache()
        result = JobResult()
        try:
            trained = train(
                model, dataset, out, recipe, device=self.device, cache_dir=cache_dir, emit=emit, control=control,
                resume=spec.resume, model_hashes=model_hashes(base) if base.is_file() else None,
                on_network=self._set_training,
            )
        finally:
            self._set_training(None)
        result.final, result.samples, result.steps_done = trained.final, trained.samples, trained.steps

        def progress(stage: str):
            return lambda done, total: emit("progress", {"stage": stage, "done": done, "total": total, "loss": None,
                                                         "avg_loss": None, "lr_unet": None, "lr_te": None, "rate": None, "eta_s": None})

        single_file = base.is_file()
        if recipe.resize_recipe and single_file:
            emit("stage", {"stage": "resize"})
            report = resize(base, trained.final, recipe.resize_recipe, out_dir=out, device=self.device, progress=progress("resize"))
            for line in report.lines():
                emit("log", {"level": "info", "text": f"resize: {line}"})
            result.resized = report.path
            emit("artifact", {"path": str(report.path), "kind": "resized", "bytes": report.path.stat().st_size, "step": trained.steps})
        elif recipe.resize_recipe:
            emit("log", {"level": "warning", "text": f"resize skipped: it needs a single-file base checkpoint, and {base} is a folder"})

        emit("stage", {"stage": "analyze"})
        analysis = energy(trained.final, base=base if single_file else None)
        keep = suggest(analysis.shares, 0.9)
        analysis_path = out / "blocks.json"
        atomic_write_text(analysis_path, json.dumps({
            "lora": str(trained.final),
            "vector_string": analysis.layout.vector_string,
            "pass_through": analysis.passthrough.tensors,
            "blocks": [{"name": b.name, "label": b.short, "tensors": b.tensors, "energy": b.energy,
                        "relative": b.relative, "share": b.share} for b in analysis.blocks],
            "suggested_vector_90": ",".join(f"{v:g}" for v in keep),
        }, indent=1))
        emit("artifact", {"path": str(analysis_path), "kind": "analysis", "bytes": analysis_path.stat().st_size, "step": None})
        top = sorted(analysis.blocks, key=lambda b: -b.share)[:3]
        emit("log", {"level": "info", "text": "blocks with the most energy: " + ", ".join(f"{b.short} {100 * b.share:.0f}%" for b in top)
                     + f"; 90% of it is kept by {','.join(f'{v:g}' for v in keep)}"})

        if spec.block_vector:
            emit("stage", {"stage": "chop"})
            chopped = chop(result.resized or trained.final, spec.block_vector)
            result.chopped = chopped.path
            emit("artifact", {"path": str(chopped.path), "kind": "chopped", "bytes": chopped.path.stat().st_size, "step": trained.steps})
        emit("stage", {"stage": "done"})
        return result

    def _set_training(self, network) -> None:
        self._training = network

    # ---------------------------------------------------------------- previews

    def preview(self, lora: Path, vector: str | None, prompts: list[str] | None, seed: int, model: str | None, out_dir: Path) -> list[Path]:
        """Render prompt lines (kohya's sample-prompt syntax; none: the prompts the LoRA's job
        sampled during training, seeds included) with `lora` applied at the block vector's strengths (the Block Weight loader's meaning: entry 0 is BASE, the text
        encoders). During a job it borrows the job's model between two steps: the job's own
        adapters are set aside and put back, so training is unaffected."""
        import logging

        from loradrop.fsutil import atomic_path

        from .data.prompts import SamplePrompt, parse_prompt_line
        from .lora.apply import apply_lora
        from .train.loop import RESOLVED_PROMPTS, Precision
        from .train.sampling import preserved_rng, sample

        log = logging.getLogger(__name__)
        target = self._model if self._training is not None else self.model(model)
        if not prompts:  # the job's own sample prompts, as its training rendered them
            resolved = Path(lora).parent / RESOLVED_PROMPTS
            prompts = resolved.read_text().splitlines() if resolved.is_file() else []
        parsed = [parse_prompt_line(p, log.warning) for p in prompts] if prompts else [SamplePrompt(prompt="")]
        dtype = Precision.for_run_settings("bf16", self.device).weights
        tag = hashlib.sha256(f"{lora}|{vector}|{seed}|{prompts}".encode()).hexdigest()[:10]
        paths = []
        network = self._training
        if network is not None:
            network.restore()
        try:
            with apply_lora(target, lora, vector), preserved_rng(self.device):
                for i, prompt in enumerate(parsed):
                    image = sample(target, prompt, device=self.device, dtype=dtype, default_seed=seed)
                    path = out_dir / f"preview-{tag}-{i:02d}.png"
                    with atomic_path(path) as tmp:
                        image.save(tmp, format="PNG")
                    paths.append(path)
        finally:
            if network is not None:
                network.apply_to()
        return paths


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loradrop" / "latents"
