"""The training loop of the seed recipe, readable top to bottom.

Every random choice of a micro-batch (which batch, flips, caption order, noise, timesteps) is
drawn from generators seeded by (recipe seed, global micro-batch index). So the data order is a
pure function of the step: a resumed run continues exactly where it stopped, and N processes that
split each update's micro-batches between them compute the single-process update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import time
from collections import deque
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from loradrop.errors import UserError

from ..data.captions import process_caption
from ..data.dataset import Dataset, epoch_batches
from ..data.latents import CachedLatent, LatentCache
from ..data.prompts import SamplePrompt, parse_prompt_file, prompts_from_captions
from ..lora.lorafile import save_lora_payload
from ..models.sdxl import SDXL
from ..pipeline import Cancelled, Control, Emit, NoControl
from ..recipe import Recipe
from .. import tensorfile
from . import checkpoints, metadata
from .conditioning import encode_text, size_ids, tokenize
from .distributed import World, average_gradients
from .network import LoConNetwork
from .noise import add_noise, alphas_cumprod, multires_noise
from .sampling import preserved_rng, sample
from .schedule import lr_factor

log = logging.getLogger(__name__)

RESOLVED_PROMPTS = "sample-prompts.txt"  # in the output folder
# The full training state (fp32 network and optimizer: ~1.4 GB at SDXL size) goes with a step
# file at most this often, and always when a job stops or ends; a resume from an older state
# retrains the steps since, to the same weights (every step is a pure function of the state).
STATE_INTERVAL_S = 30.0
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


@dataclasses.dataclass
class TrainResult:
    final: Path
    steps: int
    step_files: list[Path]
    samples: list[Path]
    last_loss: float | None


@dataclasses.dataclass
class Precision:
    """Frozen weights' dtype and the autocast used for the forward pass."""

    weights: torch.dtype
    autocast: torch.dtype | None

    @classmethod
    def for_run(cls, recipe: Recipe, device: torch.device) -> "Precision":
        return cls.for_run_settings(recipe.mixed_precision, device)

    @classmethod
    def for_run_settings(cls, mixed_precision: str, device: torch.device) -> "Precision":
        # Mixed precision is a GPU feature; on a CPU bf16 is slow and gains nothing.
        if device.type != "cuda" or mixed_precision == "no":
            return cls(torch.float32, None)
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        return cls(dtype, dtype)

    def context(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


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
    on_network: Callable[[LoConNetwork | None], None] | None = None,
    state_interval_s: float = STATE_INTERVAL_S,
) -> TrainResult:
    control = control or NoControl()
    precision = Precision.for_run(recipe, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = recipe.output_name

    # ---- data: report what the scan skipped, cache latents, pick the sample prompts
    dataset_dir = dataset.folder
    _report_skipped(dataset, emit)
    prompts = _sample_prompts(dataset_dir, dataset, recipe, emit)
    if world.is_main and prompts:
        # The prompts as sampled, seeds resolved: previews of this job render the same pictures.
        from loradrop.fsutil import atomic_write_text

        resolved = [dataclasses.replace(p, seed=recipe.seed + i if p.seed is None else p.seed) for i, p in enumerate(prompts)]
        atomic_write_text(out_dir / RESOLVED_PROMPTS, "".join(p.line() + "\n" for p in resolved))
    emit("stage", {"stage": "cache"})
    latents = _cache_latents(model, dataset, cache_dir, device, world, emit, recipe.max_data_loader_n_workers)
    items = [i for i in range(len(latents)) for _ in range(dataset.items[i].repeats)]  # an N_name/ subfolder's N
    buckets = [latents[i].target_size for i in items]
    num_batches = len(epoch_batches(buckets, recipe.train_batch_size, recipe.seed, 0))

    # ---- network and optimizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # the adapters' initial down weights
        network = LoConNetwork(model, recipe)
    network.place(device)
    network.apply_to()
    if on_network is not None:
        on_network(network)  # so a preview between two steps can set the adapters aside
    writer = checkpoints.BackgroundWriter()
    tb = _tensorboard(out_dir, recipe) if world.is_main else None
    try:
        groups = network.param_groups(recipe)
        params = [p for g in groups for p in g["params"]]
        optimizer = _make_optimizer(groups, recipe)
        train_te = any(g["name"] == "text_encoder" for g in groups)
        _enable_checkpointing(model, recipe, train_te, device)
        if not recipe.sdpa:
            from diffusers.models.attention_processor import AttnProcessor

            model.unet.set_attn_processor(AttnProcessor())
        scaler = torch.amp.GradScaler(device.type) if precision.autocast == torch.float16 else None

        step = 0
        state_path = out_dir / "state" / checkpoints.STATE_FILE
        fingerprint = _fingerprint(recipe, latents, [item.repeats for item in dataset.items])
        if resume and state_path.exists():
            tensors, info = checkpoints.read_state(state_path)
            if info.get("fingerprint") != fingerprint:
                emit("log", {"level": "warning", "text": f"{state_path} was saved with another recipe or dataset; starting over"})
            else:
                step = checkpoints.restore_state(network, optimizer, tensors, info)
                emit("log", {"level": "info", "text": f"resuming after step {step} from {state_path}"})

        meta = metadata.training_metadata(
            recipe,
            captions=[dataset.items[i].caption for i in items],
            buckets=buckets,
            dataset_dir=dataset_dir,
            num_batches_per_epoch=num_batches,
            world_size=world.size,
            model_path=str(model.source),
            model_hashes=model_hashes,
            started_at=time.time(),
            dataset_dirs={(s.name or dataset_dir.name): (s.repeats, s.images) for s in dataset.subsets if s.images},
        )
        ac = alphas_cumprod().to(device)
        save_dtype = SAVE_DTYPES[recipe.save_precision]
        step_files: list[Path] = []
        sample_files: list[Path] = []
        recent: deque[float] = deque(maxlen=max(1, math.ceil(num_batches / recipe.gradient_accumulation_steps)))
        loss_value: float | None = None
        micro_per_update = recipe.gradient_accumulation_steps * world.size
        epoch_cache: dict[int, list[list[int]]] = {}

        def batches_for(epoch: int) -> list[list[int]]:
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = epoch_batches(buckets, recipe.train_batch_size, recipe.seed, epoch)
            return epoch_cache[epoch]

        def micro_batch_loss(g: int) -> torch.Tensor:
            epoch, index = divmod(g, num_batches)
            members = [items[i] for i in batches_for(epoch)[index]]
            rng = random.Random(f"{recipe.seed}/{g}")
            gen = torch.Generator(device).manual_seed(int.from_bytes(hashlib.sha256(f"{recipe.seed}/{g}".encode()).digest()[:8], "little") >> 1)
            x0, captions, orig, crop, target = [], [], [], [], []
            for i in members:
                cached = latents[i]
                flip = recipe.flip_aug and rng.random() < 0.5
                x0.append(cached.flipped if flip else cached.latent)
                caption = dataset.items[i].caption
                captions.append(process_caption(caption, rng, shuffle=recipe.shuffle_caption, keep_tokens=recipe.keep_tokens,
                                                dropout_rate=recipe.caption_dropout_rate, tag_dropout_rate=recipe.caption_tag_dropout_rate))
                orig.append(cached.original_size)
                crop.append(cached.crop_top_left)
                target.append(cached.target_size)
            x0 = torch.stack(x0).to(device) * model.vae.config.scaling_factor
            noise = multires_noise(tuple(x0.shape), recipe.multires_noise_iterations, recipe.multires_noise_discount, gen, rng, device)
            t = torch.randint(0, len(ac), (x0.shape[0],), generator=gen, device=device)
            noisy = add_noise(x0, noise, t, ac)
            ids1, ids2 = tokenize(model, captions, device)
            with precision.context(device):
                with torch.set_grad_enabled(train_te):
                    context, pooled = encode_text(model, ids1, ids2)
                time_ids = size_ids(orig, crop, target, device)
                pred = model.unet(
                    noisy.to(precision.weights),
                    t,
                    context.to(precision.weights),
                    added_cond_kwargs={"text_embeds": pooled.to(precision.weights), "time_ids": time_ids.to(precision.weights)},
                ).sample
            return F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)).mean()

        last_state = -math.inf
        file_layout = tensorfile.Layout({k: (save_dtype, network.shapes[k]) for k in network.keys})
        assert file_layout.order == network.keys  # the flat buffer is the file's payload

        def save(step: int, final: bool) -> Path:
            path = out_dir / (f"{name}.safetensors" if final else f"{name}-step{step:08d}.safetensors")
            payload = network.snapshot(save_dtype)
            if not bool(torch.isfinite(payload).all()):  # a file with inf or NaN in it is never written
                raise UserError(diverged(f"the weights after step {step} hold inf or NaN in {recipe.save_precision}", recipe))
            epoch = step * micro_per_update // max(1, num_batches) + 1
            file_meta = metadata.at_save(meta, recipe, step=step, epoch=epoch, title=f"{name}" if final else f"{name}-step{step:08d}")

            def write() -> None:
                save_lora_payload(path, file_layout, payload, file_meta)
                emit("artifact", {"path": str(path), "kind": "final" if final else "step", "bytes": path.stat().st_size, "step": step})

            writer.submit(write)
            if final or time.monotonic() - last_state >= state_interval_s:
                save_state(step)
            return path

        def save_state(step: int) -> None:
            nonlocal last_state
            last_state = time.monotonic()
            state_tensors, info = checkpoints.capture_state(network, optimizer, step=step, extra={"fingerprint": fingerprint})
            writer.submit_state(lambda: checkpoints.write_state(state_path, state_tensors, info))

        def render_samples(step: int) -> None:
            network.eval()
            with preserved_rng(device):
                for index, prompt in enumerate(prompts):
                    image = sample(model, prompt, device=device, dtype=precision.weights, default_seed=recipe.seed + index, check=control.check)
                    path = out_dir / "samples" / f"{name}_s{step:06d}_p{index:02d}.png"
                    _save_png(image, path)
                    sample_files.append(path)
                    emit("sample", {"path": str(path), "step": step, "prompt_index": index, "prompt": prompt.prompt})
            network.train()

        # ---- the loop: one iteration is one optimizer update
        emit("stage", {"stage": "train"})
        total = recipe.max_train_steps
        started, first_step = time.perf_counter(), step
        network.train()
        while step < total:
            loss_sum = 0.0
            for j in range(recipe.gradient_accumulation_steps):
                g = step * micro_per_update + j * world.size + world.rank
                loss = micro_batch_loss(g)
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
            factor = lr_factor(recipe.lr_scheduler, step, total, recipe.lr_warmup_steps, float(recipe.lr_scheduler_args.get("num_cycles", 0.5)))
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            loss_value = loss_sum / recipe.gradient_accumulation_steps
            recent.append(loss_value)
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            elapsed = time.perf_counter() - started
            rate = (step - first_step) / elapsed if elapsed > 0 else None
            emit("progress", {
                "stage": "train", "done": step, "total": total, "loss": loss_value,
                "avg_loss": sum(recent) / len(recent), "lr_unet": lrs.get("unet"), "lr_te": lrs.get("text_encoder"),
                "rate": rate, "eta_s": (total - step) / rate if rate else None,
            })
            if tb is not None:
                tb.add_scalar("loss/current", loss_value, step)
                tb.add_scalar("loss/average", sum(recent) / len(recent), step)
                for group_name, lr in lrs.items():
                    tb.add_scalar(f"lr/{group_name.replace('_', '')}", lr, step)

            # Scheduled saves first, so a cancel or a crash right after keeps this step.
            saved = world.is_main and step < total and bool(recipe.save_every_n_steps) and step % recipe.save_every_n_steps == 0
            sampled = world.is_main and bool(recipe.sample_every_n_steps) and step % recipe.sample_every_n_steps == 0
            if saved:
                step_files.append(save(step, final=False))
            try:
                if sampled:
                    render_samples(step)  # stops between denoising steps on a cancel or a stop
                requests = control.poll()
                if world.is_main and "save" in requests and not saved and step < total:
                    step_files.append(save(step, final=False))
                if world.is_main and "sample" in requests and not sampled:
                    render_samples(step)  # asked for: a stop during it keeps this step too
            except Cancelled:
                if world.is_main:
                    save_state(step)  # a stopped job resumes exactly here
                raise

        final = out_dir / f"{name}.safetensors"
        if world.is_main:
            final = save(step, final=True)
            writer.flush()
        world.barrier()
        return TrainResult(final=final, steps=step, step_files=step_files, samples=sample_files, last_loss=loss_value)
    finally:
        # Whatever ended the run (done, cancelled, an error), what was submitted reaches the
        # disk and the base model is given back untouched.
        writer.close()
        if tb is not None:
            tb.close()
        network.restore()
        _disable_checkpointing(model)
        if not recipe.sdpa:
            model.unet.set_default_attn_processor()  # the model stays loaded for the next job


# ---------------------------------------------------------------- pieces


def diverged(what: str, recipe: Recipe) -> str:
    """The one sentence for a run whose numbers left the finite range (kohya: "NaN detected")."""
    return (f"training diverged: {what} (NaN detected); lower the learning rate (unet_lr {recipe.unet_lr:g}, "
            f"text_encoder_lr {recipe.text_encoder_lr:g}) or keep max_grad_norm on, and retry the job.")


def _report_skipped(dataset: Dataset, emit: Emit) -> None:
    warning = dataset.skipped_warning()
    if warning:
        emit("log", {"level": "warning", "text": warning})


def _sample_prompts(dataset_dir: Path, dataset: Dataset, recipe: Recipe, emit: Emit) -> list[SamplePrompt]:
    if not recipe.sample_every_n_steps:
        return []
    path = dataset_dir / recipe.sample_prompts
    if path.is_file():
        return parse_prompt_file(path)
    emit("log", {"level": "info", "text": f"no {recipe.sample_prompts} in the dataset: sampling a few of its own captions"})
    return prompts_from_captions(dataset.items)


def _cache_latents(model: SDXL, dataset: Dataset, cache_dir: Path, device, world: World, emit: Emit, workers: int) -> list[CachedLatent]:
    cache = LatentCache(cache_dir, model.vae, model.vae_id, device, workers=workers)

    def progress(done: int, total: int) -> None:
        emit("progress", {"stage": "cache", "done": done, "total": total, "loss": None, "avg_loss": None,
                          "lr_unet": None, "lr_te": None, "rate": None, "eta_s": None})

    # The main process encodes; the others then find every latent cached.
    if world.is_main:
        out = cache.ensure(dataset.items, progress=progress)
    world.barrier()
    if not world.is_main:
        out = cache.ensure(dataset.items)
    return out


def _make_optimizer(groups: list[dict], recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer_type == "ClybW":
        from .clybw import ClybW

        # The multi-tensor path gives the same bits as the per-tensor one, faster on ~1,700 tensors.
        return ClybW(groups, lr=recipe.learning_rate, **{"foreach": True, **recipe.optimizer_args})
    return torch.optim.AdamW(groups, lr=recipe.learning_rate, **recipe.optimizer_args)


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


# Settings that change what is saved or shown, not the weights: a resume may change them.
_NOT_MATH = {
    "output_name", "sample_prompts", "sample_sampler", "sample_every_n_steps", "save_every_n_steps",
    "save_precision", "save_model_as", "log_with", "log_prefix", "resize_recipe", "max_data_loader_n_workers", "sdpa",
}


def _fingerprint(recipe: Recipe, latents: list[CachedLatent], repeats: list[int] | None = None) -> str:
    """What a saved state must match to be resumed: the training settings and the data."""
    math_settings = {k: v for k, v in recipe.to_dict().items() if k not in _NOT_MATH}
    h = hashlib.sha256(repr(sorted(math_settings.items())).encode())
    for cached in latents:
        h.update(cached.key.encode())
    if repeats and any(n != recipe.dataset_repeats for n in repeats):
        h.update(repr(repeats).encode())  # N_name/ repeats shape the epoch; a flat folder's fingerprint is unchanged
    return h.hexdigest()


def _tensorboard(out_dir: Path, recipe: Recipe):
    if recipe.log_with != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "logs" / f"{recipe.log_prefix}{time.strftime('%Y%m%d%H%M%S')}"))


def _save_png(image, path: Path) -> None:
    from loradrop.fsutil import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
