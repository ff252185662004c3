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
`control.check()` only raises `Cancelled` (it serves nothing): sampling calls it between its
denoising steps, so a cancel or a stop never waits for a whole picture.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
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

    def check(self) -> None: ...


class NoControl:
    """For offline runs (the `train` command): nothing ever asks anything."""

    def poll(self) -> set[str]:
        return set()

    def check(self) -> None:
        pass


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
        from .lora.chop import SUFFIX as CHOP_SUFFIX, chop
        from .lora.resize import resize
        from .models.hashes import model_hashes
        from .recipe import Recipe
        from .train.loop import RESOLVED_PROMPTS, train

        recipe = Recipe.from_mapping({**spec.recipe, "output_name": spec.name}, source=f"job {spec.job_id}")
        _preflight(spec, recipe)
        out = spec.out_dir
        out.mkdir(parents=True, exist_ok=True)
        recipe_path = out / "recipe.toml"
        atomic_write_text(recipe_path, recipe.to_toml())
        emit("artifact", {"path": str(recipe_path), "kind": "recipe", "bytes": recipe_path.stat().st_size, "step": None})

        emit("stage", {"stage": "scan"})
        dataset = scan(spec.dataset, recipe)
        for line in dataset.scan_report():  # per N_name/ subfolder: images, repeats, skipped
            emit("log", {"level": "info", "text": line})
        for warning in (dataset.subfolder_warning(), dataset.orphan_warning()):
            if warning:
                emit("log", {"level": "warning", "text": warning})
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
        except (MemoryError, RuntimeError) as e:
            raise _out_of_memory(e, recipe, self.device) from None
        finally:
            self._set_training(None)
        result.final, result.samples, result.steps_done = trained.final, trained.samples, trained.steps

        def progress(stage: str):
            return lambda done, total: emit("progress", {"stage": stage, "done": done, "total": total, "loss": None,
                                                         "avg_loss": None, "lr_unet": None, "lr_te": None, "rate": None, "eta_s": None})

        single_file = base.is_file()
        if recipe.resize_recipe and single_file:
            emit("stage", {"stage": "resize"})
            holder: list = []

            def resized(staging: Path) -> Path:
                holder.append(resize(base, trained.final, recipe.resize_recipe, out_dir=staging, device=self.device, progress=progress("resize")))
                return holder[0].path

            resized_path = finite_output(resized, out)
            report = holder[0]
            report.path = resized_path
            for line in report.lines():
                emit("log", {"level": "info", "text": f"resize: {line}"})
            result.resized = report.path
            emit("artifact", {"path": str(report.path), "kind": "resized", "bytes": report.path.stat().st_size, "step": trained.steps})
        elif recipe.resize_recipe:
            emit("log", {"level": "warning", "text": f"resize skipped: it needs a single-file base checkpoint, and {base} is a folder"})

        emit("stage", {"stage": "analyze"})
        analysis = energy(trained.final, base=base if single_file else None)
        keep = suggest(analysis.shares, 0.9)
        effect = self._effect(trained.final, [out / RESOLVED_PROMPTS, spec.dataset / recipe.sample_prompts], recipe, model, progress("analyze"))
        analysis_path = out / "blocks.json"
        atomic_write_text(analysis_path, json.dumps({
            "lora": str(trained.final),
            "vector_string": analysis.layout.vector_string,
            "pass_through": analysis.passthrough.tensors,
            "blocks": [{"name": b.name, "label": b.short, "tensors": b.tensors, "energy": b.energy,
                        "relative": b.relative, "share": b.share} for b in analysis.blocks],
            "suggested_vector_90": ",".join(f"{v:g}" for v in (effect[0] if effect else keep)),
            "suggested_by": "effect" if effect else "energy",
            "effect_shares": effect[1].shares if effect else None,
        }, indent=1))
        emit("artifact", {"path": str(analysis_path), "kind": "analysis", "bytes": analysis_path.stat().st_size, "step": None})
        top = sorted(analysis.blocks, key=lambda b: -b.share)[:3]
        emit("log", {"level": "info", "text": "blocks with the most energy: " + ", ".join(f"{b.short} {100 * b.share:.0f}%" for b in top)
                     + f"; 90% of it is kept by {','.join(f'{v:g}' for v in keep)}"})
        if effect:
            vector, report = effect
            top = sorted(zip(analysis.blocks, report.shares), key=lambda bs: -bs[1])[:3]
            emit("log", {"level": "info", "text": "blocks with the most effect on the sample prompts: " + ", ".join(f"{b.short} {100 * s:.0f}%" for b, s in top)
                         + f"; 90% of it is kept by {','.join(f'{v:g}' for v in vector)} (the suggestion)"})

        if spec.block_vector:
            emit("stage", {"stage": "chop"})
            source = result.resized or trained.final
            name = f"{source.stem}{CHOP_SUFFIX}.safetensors"
            result.chopped = finite_output(lambda staging: chop(source, spec.block_vector, staging / name).path, out)
            emit("artifact", {"path": str(result.chopped), "kind": "chopped", "bytes": result.chopped.stat().st_size, "step": trained.steps})
        emit("stage", {"stage": "done"})
        return result

    def _set_training(self, network) -> None:
        self._training = network

    def _effect(self, lora: Path, sources: list[Path], recipe, model, progress: Callable[[int, int], None]):
        """The effect-based suggestion on the job's prompts (the first of `sources` that exists: as
        sampled, seeds resolved; else the dataset's own): (vector, report), or None when the
        recipe asks for energy or there are no prompts to measure on."""
        from .data.prompts import parse_prompt_file
        from .lora.effect import suggest_by_effect

        source = next((p for p in sources if p.is_file()), None)
        prompts = parse_prompt_file(source) if source is not None and recipe.suggest_by == "effect" else []
        if not prompts:
            return None
        return suggest_by_effect(model, lora, prompts, 0.9, progress=progress)

    # ---------------------------------------------------------------- previews

    def start_preview(self, lora: Path, vector: str | None, prompts: list[str] | None, seed: int, model: str | None, out_dir: Path,
                      *, steps: int | None = None, progress: Callable[[dict[str, int]], None] | None = None) -> "PreviewRender":
        """A preview to render in slices (`PreviewRender.advance`): prompt lines in kohya's sample
        syntax (none: the prompts the LoRA's job sampled during training, seeds included),
        `lora` applied at the block vector's strengths (the Block Weight loader's meaning: entry
        0 is BASE, the text encoders). `steps` (default: at most PREVIEW_STEPS) sets every
        prompt's denoising steps. During a job it borrows the job's model between two steps."""
        return PreviewRender(self, lora, vector, prompts, seed, model, out_dir, steps, progress)

    def preview(self, lora: Path, vector: str | None, prompts: list[str] | None, seed: int, model: str | None, out_dir: Path,
                steps: int | None = None) -> list[Path]:
        """A whole preview at once (see `start_preview`); the images' paths."""
        render = self.start_preview(lora, vector, prompts, seed, model, out_dir, steps=steps)
        render.advance(math.inf, lambda: None)
        return render.paths


PREVIEW_STEPS = 8  # a preview's denoising steps unless the request asks for more (a rough look, quickly)
PREVIEW_BUDGET_S = 300.0  # compute seconds a preview may need on this machine, judged from its first step


class PreviewRender:
    """A preview being rendered: its prompts one after another, a denoising step at a time. Each
    `advance` is a slice: the running job's adapters are set aside, the preview's LoRA applied,
    steps rendered for the time given, and everything put back, so training between two slices
    is unaffected (and the pictures do not depend on how they were sliced)."""

    def __init__(self, session: Session, lora: Path, vector: str | None, prompts: list[str] | None, seed: int, model: str | None,
                 out_dir: Path, steps: int | None, progress: Callable[[dict[str, int]], None] | None):
        import dataclasses
        import logging

        from .data.prompts import SamplePrompt, parse_prompt_line
        from .lora.lorafile import read_lora
        from .train.loop import RESOLVED_PROMPTS, Precision

        log = logging.getLogger(__name__)
        self.session, self.vector, self.seed, self.out_dir, self.progress = session, vector, seed, out_dir, progress
        self.target = session._model if session._training is not None else session.model(model)
        if not prompts:  # the job's own sample prompts, as its training rendered them
            resolved = Path(lora).parent / RESOLVED_PROMPTS
            prompts = resolved.read_text().splitlines() if resolved.is_file() else []
        parsed = [parse_prompt_line(p, log.warning) for p in prompts] if prompts else [SamplePrompt(prompt="")]
        self.prompts = [dataclasses.replace(p, steps=steps or min(p.steps, PREVIEW_STEPS)) for p in parsed]
        self.lora = read_lora(lora)  # read once: each slice applies it from memory
        self.dtype = Precision.for_run_settings("bf16", session.device).weights
        self.tag = hashlib.sha256(f"{lora}|{vector}|{seed}|{prompts}|{steps}".encode()).hexdigest()[:10]
        self.paths: list[Path] = []
        self._render = None
        self._judged = False

    @property
    def finished(self) -> bool:
        return len(self.paths) == len(self.prompts)

    def advance(self, seconds: float, check: Callable[[], None]) -> None:
        """Render for about `seconds` (one denoising step at least); `check` raises to stop."""
        import time

        from loradrop.fsutil import atomic_path

        from .train.sampling import Render

        started = time.monotonic()
        with self._on_model():
            while not self.finished:
                check()
                index = len(self.paths)
                if self._render is None:
                    self._render = Render(self.target, self.prompts[index], device=self.session.device, dtype=self.dtype, default_seed=self.seed)
                before = time.monotonic()
                self._render.step()
                self._judge(time.monotonic() - before)
                if self.progress is not None:
                    self.progress({"image": index + 1, "images": len(self.prompts), "step": self._render.done, "steps": self._render.total})
                if self._render.finished:
                    path = self.out_dir / f"preview-{self.tag}-{index:02d}.png"
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
            from loradrop.errors import UserError

            first = self.prompts[0]
            raise UserError(f"this preview would take about {step_seconds * steps / 60:.0f} minutes on {self.session.device} "
                            f"({steps} denoising steps at {first.width}x{first.height}); ask for fewer steps or a smaller size (--w, --h).")

    @contextlib.contextmanager
    def _on_model(self):
        from .lora.apply import apply_lora
        from .train.sampling import preserved_rng

        network = self.session._training
        if network is not None:
            network.restore()
        try:
            with apply_lora(self.target, self.lora, self.vector), preserved_rng(self.session.device):
                yield
        finally:
            if network is not None:
                network.apply_to()


def finite_output(write: Callable[[Path], Path], out_dir: Path) -> Path:
    """Run `write(staging)`, which writes one LoRA into a hidden folder and returns its path;
    refuse it if a tensor is inf or NaN, else move it into `out_dir`. A file that is not finite is
    never listed, not even for a moment (listings skip hidden folders)."""
    import shutil

    from .tensorfile import TensorFile

    staging = out_dir / f".staging-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        written = write(staging)
        with TensorFile(written) as tf:
            bad = next((k for k, t in tf.read_all().items() if t.is_floating_point() and not bool(t.isfinite().all())), None)
        if bad is not None:
            from loradrop.errors import UserError

            raise UserError(f"{written.name} would hold inf or NaN (in {bad}); it was not kept: lower the block weights, or retrain with a lower learning rate.")
        final = out_dir / written.name
        os.replace(written, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _preflight(spec: JobSpec, recipe) -> None:
    """What can fail late is checked before any training: the resize recipe, the chop vector."""
    from .recipe import check_block_vector

    if recipe.resize_recipe:
        from .lora.resize import ResizeRecipe

        ResizeRecipe.parse(recipe.resize_recipe)
    if spec.block_vector:
        check_block_vector(spec.block_vector)


def _out_of_memory(e: BaseException, recipe, device) -> BaseException:
    """Memory that ran out, said with the settings that size a run; any other error as it is."""
    text = str(e)
    if not isinstance(e, MemoryError) and "out of memory" not in text.lower() and "can't allocate memory" not in text:
        return e
    from loradrop.errors import UserError

    return UserError(f"training ran out of memory on {device} ({text.splitlines()[0][:120] if text else 'MemoryError'}); lower what sizes the run: "
                     f"train_batch_size {recipe.train_batch_size}, resolution {recipe.resolution}, network_dim {recipe.network_dim}, "
                     f"conv_dim {recipe.conv_dim}, dataset_repeats {recipe.dataset_repeats}.")


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loradrop" / "latents"
