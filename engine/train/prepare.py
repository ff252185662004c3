"""What a run needs before its first step: the scan's warnings, the sample prompts, the cached
latents, and the fingerprint a saved state must match to be resumed."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from loradrop.fsutil import atomic_write_text

from ..data.dataset import Dataset
from ..data.latents import CachedLatent, LatentCache
from ..data.prompts import SamplePrompt, parse_prompt_file, prompts_from_captions
from ..events import Emit, Log, Progress
from ..models.sdxl import SDXL
from ..recipe import Recipe
from .distributed import World


def sample_prompts(dataset: Dataset, recipe: Recipe, emit: Emit, resolved: Path | None) -> list[SamplePrompt]:
    """The prompts to sample during training (the dataset's file, else a few of its captions),
    written to `resolved` with their seeds resolved, so a later preview renders the same pictures."""
    if not recipe.sample_every_n_steps:
        return []
    path = dataset.folder / recipe.sample_prompts
    if path.is_file():
        prompts = parse_prompt_file(path)
    else:
        emit(Log(f"no {recipe.sample_prompts} in the dataset: sampling a few of its own captions"))
        prompts = prompts_from_captions(dataset.items)
    if resolved is not None and prompts:
        seeded = [
            dataclasses.replace(p, seed=recipe.seed + i if p.seed is None else p.seed)
            for i, p in enumerate(prompts)
        ]
        atomic_write_text(resolved, "".join(p.line() + "\n" for p in seeded))
    return prompts


def cache_latents(
    model: SDXL, dataset: Dataset, cache_dir: Path, device, world: World, emit: Emit, workers: int
) -> list[CachedLatent]:
    cache = LatentCache(cache_dir, model.vae, model.vae_id, device, workers=workers)
    # The main process encodes; the others then find every latent cached.
    if world.is_main:
        out = cache.ensure(dataset.items, progress=lambda done, total: emit(Progress("cache", done, total)))
    world.barrier()
    if not world.is_main:
        out = cache.ensure(dataset.items)
    return out


# Settings that change what is saved or shown, not the weights: a resume may change them.
_NOT_MATH = {
    "output_name",
    "sample_prompts",
    "sample_sampler",
    "sample_every_n_steps",
    "save_every_n_steps",
    "save_precision",
    "save_model_as",
    "log_with",
    "log_prefix",
    "resize_recipe",
    "max_data_loader_n_workers",
    "sdpa",
}


def fingerprint(recipe: Recipe, latents: list[CachedLatent], repeats: list[int] | None = None) -> str:
    """What a saved state must match to be resumed: the training settings and the data."""
    math_settings = {k: v for k, v in recipe.to_dict().items() if k not in _NOT_MATH}
    h = hashlib.sha256(repr(sorted(math_settings.items())).encode())
    for cached in latents:
        h.update(cached.key.encode())
    if repeats and any(n != recipe.dataset_repeats for n in repeats):
        h.update(
            repr(repeats).encode()
        )  # N_name/ repeats shape the epoch; a flat folder's fingerprint is unchanged
    return h.hexdigest()
