"""The training loop of the seed recipe: setup → one optimizer update per iteration → teardown.

The parts it is built from: the micro-batch loss, a pure function of the global micro-batch
index (microbatch.py); the saver, which owns the files and the state's cadence (saver.py); the
precision (precision.py); the file names (engine/outputs.py). Between two updates the loop asks
its `Control` what arrived (a save, a sample, a cancel) and lends it the network, so a preview
can set the job's adapters aside for a bounded slice of time and put them back.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from loradrop.errors import UserError

from ..data.dataset import Dataset
from ..events import SAMPLE, SAVE, Cancelled, Control, Emit, Log, NoControl, Progress, Sample, Stage
from ..models.sdxl import SDXL, Prediction
from ..outputs import Outputs
from ..recipe import Recipe
from . import metadata, prepare
from .distributed import World, average_gradients
from .microbatch import TrainingData, micro_batch_loss
from .network import LoConNetwork
from .noise import alphas_cumprod
from .precision import Precision
from .sampling import preserved_rng, sample
from .saver import STATE_INTERVAL_S, Saver, diverged
from .schedule import lr_factor


@dataclass
class TrainResult:
    final: Path
    steps: int
    step_files: list[Path]
    samples: list[Path]


def train(
    model: SDXL,
    dataset: Dataset,
    out_dir: Path,
    recipe: Recipe,
    *,
    device: torch.device,
    cache_dir: Path,
    emit: Emit,
    control: Control | None = None,
    resume: bool = False,
    world: World = World(),
    model_hashes: tuple[str, str] | None = None,
    state_interval_s: float = STATE_INTERVAL_S,
) -> TrainResult:
    # ---- setup: data, network, optimizer, saver
    control = control or NoControl()
    precision = Precision.for_run_settings(recipe.mixed_precision, device)
    outputs = Outputs(out_dir, recipe.output_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    warning = dataset.skipped_warning()
    if warning:
        emit(Log(warning, "warning"))
    prompts = prepare.sample_prompts(dataset, recipe, emit, outputs.prompts if world.is_main else None)
    emit(Stage("cache"))
    latents = prepare.cache_latents(
        model, dataset, cache_dir, device, world, emit, recipe.max_data_loader_n_workers
    )
    items = [
        i for i in range(len(latents)) for _ in range(dataset.items[i].repeats)
    ]  # an N_name/ subfolder's N
    data = TrainingData(
        latents, [item.caption for item in dataset.items], items, recipe.train_batch_size, recipe.seed
    )
    micro_per_update = recipe.gradient_accumulation_steps * world.size
    prediction = model.prediction_for(
        recipe
    )  # ε or v, and the schedule: the checkpoint's unless the recipe says

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # the adapters' initial down weights
        network = LoConNetwork(model, recipe)
    network.place(device)
    # ---- teardown, registered as each part is set up: whatever ends the run (done, cancelled, an
    # error), what was submitted reaches the disk and the base model is given back untouched.
    with contextlib.ExitStack() as teardown:
        network.apply_to()
        teardown.callback(network.restore)
        groups = network.param_groups(recipe)
        params = [p for g in groups for p in g["params"]]
        optimizer = _make_optimizer(groups, recipe)
        train_te = any(g["name"] == "text_encoder" for g in groups)
        teardown.enter_context(_memory_savers(model, recipe, train_te, device))
        saver = Saver(
            network,
            optimizer,
            outputs,
            recipe,
            _metadata(recipe, data, dataset, model, world, model_hashes, prediction),
            fingerprint=prepare.fingerprint(recipe, latents, [item.repeats for item in dataset.items]),
            epoch_of=lambda step: step * micro_per_update // max(1, data.num_batches) + 1,
            emit=emit,
            state_interval_s=state_interval_s,
        )
        teardown.callback(saver.close)
        tb = _tensorboard(outputs, recipe) if world.is_main else None
        if tb is not None:
            teardown.callback(tb.close)
        scaler, ac = (
            precision.grad_scaler(device),
            alphas_cumprod(zero_terminal_snr=prediction.ztsnr).to(device),
        )
        step = saver.resume() if resume else 0
        recent: deque[float] = deque(
            maxlen=max(1, math.ceil(data.num_batches / recipe.gradient_accumulation_steps))
        )
        total, started, first_step, samples = recipe.max_train_steps, time.perf_counter(), step, []

        def render_samples(step: int) -> list[Path]:
            return _render_samples(
                model, network, prompts, outputs, step, recipe, precision, prediction, device, control, emit
            )

        # ---- the loop: one iteration is one optimizer update
        emit(Stage("train"))
        network.train()
        while step < total:
            loss = _update(
                step,
                lambda g: micro_batch_loss(
                    model,
                    data,
                    g,
                    recipe,
                    ac,
                    precision=precision,
                    prediction=prediction,
                    train_te=train_te,
                    device=device,
                ),
                optimizer,
                params,
                scaler,
                recipe,
                world,
                total,
            )
            step += 1
            recent.append(loss)
            _report(
                emit,
                tb,
                optimizer,
                step,
                total,
                loss,
                recent,
                (step - first_step) / max(time.perf_counter() - started, 1e-9),
            )

            # Scheduled saves first, so a cancel or a crash right after keeps this step.
            saved = (
                world.is_main
                and step < total
                and bool(recipe.save_every_n_steps)
                and step % recipe.save_every_n_steps == 0
            )
            sampled = (
                world.is_main
                and bool(recipe.sample_every_n_steps)
                and step % recipe.sample_every_n_steps == 0
            )
            if saved:
                saver.step_file(step)
            try:
                if sampled:  # stops between denoising steps on a cancel or a stop
                    samples += render_samples(step)
                requests = control.poll(network)  # lent to a preview for a slice of time, and put back
                if world.is_main and SAVE in requests and not saved and step < total:
                    saver.step_file(step)
                if (
                    world.is_main and SAMPLE in requests and not sampled
                ):  # a stop during it keeps this step too
                    samples += render_samples(step)
            except Cancelled:
                if world.is_main:
                    saver.state(step)  # a stopped job resumes exactly here
                raise

        final = saver.final(step) if world.is_main else outputs.final
        world.barrier()
        return TrainResult(final=final, steps=step, step_files=saver.step_files, samples=samples)


# ---------------------------------------------------------------- pieces


def _update(step: int, loss_of, optimizer, params, scaler, recipe: Recipe, world: World, total: int) -> float:
    """One optimizer update from the update's micro-batches (this process's share); its mean loss."""
    micro_per_update = recipe.gradient_accumulation_steps * world.size
    loss_sum = 0.0
    for j in range(recipe.gradient_accumulation_steps):
        loss = loss_of(step * micro_per_update + j * world.size + world.rank)
        scaled = loss / recipe.gradient_accumulation_steps
        (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += loss.item()
    if not math.isfinite(loss_sum):  # before the step: the weights never take a NaN update
        raise UserError(diverged(f"the loss became {loss_sum:g} at step {step + 1}", recipe))
    average_gradients(params, world)
    if scaler:
        scaler.unscale_(optimizer)
    if recipe.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
    factor = lr_factor(
        recipe.lr_scheduler,
        step,
        total,
        recipe.lr_warmup_steps,
        float(recipe.lr_scheduler_args.get("num_cycles", 0.5)),
    )
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / recipe.gradient_accumulation_steps


def _report(
    emit: Emit, tb, optimizer, step: int, total: int, loss: float, recent: deque[float], rate: float
) -> None:
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    average = sum(recent) / len(recent)
    emit(
        Progress(
            "train",
            step,
            total,
            loss=loss,
            avg_loss=average,
            lr_unet=lrs.get("unet"),
            lr_te=lrs.get("text_encoder"),
            rate=rate,
            eta_s=(total - step) / rate if rate else None,
        )
    )
    if tb is not None:
        tb.add_scalar("loss/current", loss, step)
        tb.add_scalar("loss/average", average, step)
        for group_name, lr in lrs.items():
            tb.add_scalar(f"lr/{group_name.replace('_', '')}", lr, step)


def _render_samples(
    model: SDXL,
    network: LoConNetwork,
    prompts,
    outputs: Outputs,
    step: int,
    recipe: Recipe,
    precision: Precision,
    prediction: Prediction,
    device: torch.device,
    control: Control,
    emit: Emit,
) -> list[Path]:
    from loradrop.fsutil import atomic_path

    paths = []
    network.eval()
    with preserved_rng(device):
        for index, prompt in enumerate(prompts):
            image = sample(
                model,
                prompt,
                device=device,
                dtype=precision.weights,
                default_seed=recipe.seed + index,
                check=control.check,
                prediction=prediction,
            )
            path = outputs.sample(step, index)
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            paths.append(path)
            emit(Sample(str(path), step, index, prompt.prompt))
    network.train()
    return paths


def _make_optimizer(groups: list[dict], recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer_type == "ClybW":
        from .clybw import ClybW

        # The multi-tensor path gives the same bits as the per-tensor one, faster on ~1,700 tensors.
        return ClybW(groups, lr=recipe.learning_rate, **{"foreach": True, **recipe.optimizer_args})
    return torch.optim.AdamW(groups, lr=recipe.learning_rate, **recipe.optimizer_args)


def _metadata(
    recipe: Recipe,
    data: TrainingData,
    dataset: Dataset,
    model: SDXL,
    world: World,
    model_hashes,
    prediction: Prediction,
) -> dict[str, str]:
    return metadata.training_metadata(
        recipe,
        captions=[data.captions[i] for i in data.items],
        buckets=data.buckets,
        dataset_dir=dataset.folder,
        num_batches_per_epoch=data.num_batches,
        world_size=world.size,
        model_path=str(model.source),
        model_hashes=model_hashes,
        started_at=time.time(),
        dataset_dirs={
            (s.name or dataset.folder.name): (s.repeats, s.images) for s in dataset.subsets if s.images
        },
        prediction=prediction,
    )


@contextlib.contextmanager
def _memory_savers(model: SDXL, recipe: Recipe, train_te: bool, device: torch.device):
    """Gradient checkpointing (on a GPU) and the plain attention processor (sdpa = false) for the
    run, and the model as it was afterwards: it stays loaded for the next job."""
    _enable_checkpointing(model, recipe, train_te, device)
    if not recipe.sdpa:
        from diffusers.models.attention_processor import AttnProcessor

        model.unet.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        _disable_checkpointing(model)
        if not recipe.sdpa:
            model.unet.set_default_attn_processor()


def _enable_checkpointing(model: SDXL, recipe: Recipe, train_te: bool, device: torch.device) -> None:
    # Checkpointing trades compute for GPU memory; on a CPU there is memory to spare and the
    # recompute only makes each step slower (4x on the tiny twin). The math is the same either way.
    if not recipe.gradient_checkpointing or device.type != "cuda":
        return
    model.unet.enable_gradient_checkpointing()
    if train_te:
        for te in (model.te1, model.te2):
            # transformers 5 renamed the method; 4.x only has the old name.
            if hasattr(te, "activation_checkpointing_enable"):
                te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            te.train()


def _disable_checkpointing(model: SDXL) -> None:
    model.unet.disable_gradient_checkpointing()
    for te in (model.te1, model.te2):
        disable = getattr(te, "activation_checkpointing_disable", None) or te.gradient_checkpointing_disable
        disable()
        te.eval()


def _tensorboard(outputs: Outputs, recipe: Recipe):
    if recipe.log_with != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(outputs.logs(recipe.log_prefix, time.strftime("%Y%m%d%H%M%S"))))
