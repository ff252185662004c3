"""One job, start to finish: scan → cache latents → train → samples → resize → analyse → chop.

The engine's face to the daemon: the worker's `Session` (engine/session.py) keeps the base model
loaded and calls `run_job` for each job. Everything the job does is reported through
`emit(event)` with the records of engine/events.py; every file it writes is named by
engine/outputs.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from loradrop.errors import UserError
from loradrop.fsutil import atomic_write_text

from .events import Artifact, Control, Emit, Log, Progress, Stage
from .jobspec import JobResult, JobSpec
from .outputs import Outputs, chopped_name
from .recipe import Recipe, check_block_vector

if TYPE_CHECKING:
    from .session import Session


def run_job(session: "Session", spec: JobSpec, emit: Emit, control: Control | None = None) -> JobResult:
    from .data.dataset import scan
    from .data.latents import default_cache_dir
    from .models.hashes import model_hashes
    from .train.loop import train

    recipe = Recipe.from_mapping({**spec.recipe, "output_name": spec.name}, source=f"job {spec.job_id}")
    _preflight(spec, recipe)
    outputs = Outputs(spec.out_dir, spec.name)
    outputs.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outputs.recipe, recipe.to_toml())
    emit(Artifact.of(outputs.recipe, "recipe"))

    emit(Stage("scan"))
    dataset = scan(spec.dataset, recipe)
    for line in dataset.scan_report():  # per N_name/ subfolder: images, repeats, skipped
        emit(Log(line))
    for warning in (dataset.subfolder_warning(), dataset.orphan_warning()):
        if warning:
            emit(Log(warning, "warning"))
    model = session.model(spec.model, recipe.mixed_precision, recipe.no_half_vae)
    base = model.source
    try:
        trained = train(
            model,
            dataset,
            outputs.root,
            recipe,
            device=session.device,
            cache_dir=spec.cache_dir or default_cache_dir(),
            emit=emit,
            control=control,
            resume=spec.resume,
            model_hashes=model_hashes(base) if base.is_file() else None,
        )
    except (MemoryError, RuntimeError) as e:
        raise _out_of_memory(e, recipe, session.device) from None
    result = JobResult(final=trained.final, samples=trained.samples, steps_done=trained.steps)

    if recipe.resize_recipe and base.is_file():
        emit(Stage("resize"))
        result.resized = _resize(base, trained.final, recipe.resize_recipe, outputs, session.device, emit)
        emit(Artifact.of(result.resized, "resized", trained.steps))
    elif recipe.resize_recipe:
        emit(
            Log(f"resize skipped: it needs a single-file base checkpoint, and {base} is a folder", "warning")
        )

    emit(Stage("analyze"))
    _analyze(
        trained.final,
        base,
        model,
        recipe,
        outputs,
        [outputs.prompts, spec.dataset / recipe.sample_prompts],
        emit,
    )

    if spec.block_vector:
        from .lora.chop import chop
        from .lora.finite import finite_output

        emit(Stage("chop"))
        source = result.resized or trained.final
        result.chopped = finite_output(
            lambda staging: chop(source, spec.block_vector, staging / chopped_name(source)).path, outputs.root
        )
        emit(Artifact.of(result.chopped, "chopped", trained.steps))
    emit(Stage("done"))
    return result


def stage_progress(emit: Emit, stage: str) -> Callable[[int, int], None]:
    return lambda done, total: emit(Progress(stage, done, total))


def _resize(base: Path, lora: Path, resize_recipe: str, outputs: Outputs, device, emit: Emit) -> Path:
    from .lora.finite import finite_output
    from .lora.resize import resize

    reports = []

    def write(staging: Path) -> Path:
        reports.append(
            resize(
                base,
                lora,
                resize_recipe,
                out_dir=staging,
                device=device,
                progress=stage_progress(emit, "resize"),
            )
        )
        return reports[0].path

    path = finite_output(write, outputs.root)
    for line in reports[0].lines():
        emit(Log(f"resize: {line}"))
    return path


def _analyze(
    lora: Path, base: Path, model, recipe: Recipe, outputs: Outputs, prompt_sources: list[Path], emit: Emit
) -> None:
    """blocks.json: each block's ΔW energy, and the suggested vector (by effect on the job's
    prompts, the first of `prompt_sources` that exists, unless the recipe asks for energy)."""
    from .data.prompts import parse_prompt_file
    from .lora.blocks import energy, suggest
    from .lora.effect import suggest_by_effect

    analysis = energy(lora, base=base if base.is_file() else None)
    keep = suggest(analysis.shares, 0.9)
    source = next((p for p in prompt_sources if p.is_file()), None)
    prompts = parse_prompt_file(source) if source is not None and recipe.suggest_by == "effect" else []
    effect = (
        suggest_by_effect(model, lora, prompts, 0.9, progress=stage_progress(emit, "analyze"))
        if prompts
        else None
    )
    atomic_write_text(
        outputs.analysis,
        json.dumps(
            {
                "lora": str(lora),
                "vector_string": analysis.layout.vector_string,
                "pass_through": analysis.passthrough.tensors,
                "blocks": [
                    {
                        "name": b.name,
                        "label": b.short,
                        "tensors": b.tensors,
                        "energy": b.energy,
                        "relative": b.relative,
                        "share": b.share,
                    }
                    for b in analysis.blocks
                ],
                "suggested_vector_90": ",".join(f"{v:g}" for v in (effect[0] if effect else keep)),
                "suggested_by": "effect" if effect else "energy",
                "effect_shares": effect[1].shares if effect else None,
            },
            indent=1,
        ),
    )
    emit(Artifact.of(outputs.analysis, "analysis"))
    top = sorted(analysis.blocks, key=lambda b: -b.share)[:3]
    emit(
        Log(
            "blocks with the most energy: "
            + ", ".join(f"{b.short} {100 * b.share:.0f}%" for b in top)
            + f"; 90% of it is kept by {','.join(f'{v:g}' for v in keep)}"
        )
    )
    if effect:
        vector, report = effect
        top = sorted(zip(analysis.blocks, report.shares), key=lambda bs: -bs[1])[:3]
        emit(
            Log(
                "blocks with the most effect on the sample prompts: "
                + ", ".join(f"{b.short} {100 * s:.0f}%" for b, s in top)
                + f"; 90% of it is kept by {','.join(f'{v:g}' for v in vector)} (the suggestion)"
            )
        )


def _preflight(spec: JobSpec, recipe: Recipe) -> None:
    """What can fail late is checked before any training: the resize recipe, the chop vector."""
    if recipe.resize_recipe:
        from .lora.resize import ResizeRecipe

        ResizeRecipe.parse(recipe.resize_recipe)
    if spec.block_vector:
        check_block_vector(spec.block_vector)


def _out_of_memory(e: BaseException, recipe: Recipe, device) -> BaseException:
    """Memory that ran out, said with the settings that size a run; any other error as it is."""
    text = str(e)
    if (
        not isinstance(e, MemoryError)
        and "out of memory" not in text.lower()
        and "can't allocate memory" not in text
    ):
        return e
    return UserError(
        f"training ran out of memory on {device} ({text.splitlines()[0][:120] if text else 'MemoryError'}); lower what sizes the run: "
        f"train_batch_size {recipe.train_batch_size}, resolution {recipe.resolution}, network_dim {recipe.network_dim}, "
        f"conv_dim {recipe.conv_dim}, dataset_repeats {recipe.dataset_repeats}."
    )
