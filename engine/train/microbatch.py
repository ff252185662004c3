"""One micro-batch of the seed recipe: its loss as a pure function of the global micro-batch index.

Every random choice of a micro-batch (which batch, flips, caption order, noise, timesteps) is
drawn from generators seeded by (recipe seed, global micro-batch index). So the data order is a
pure function of the step: a resumed run continues exactly where it stopped, and N processes that
split each update's micro-batches between them compute the single-process update.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.captions import process_caption
from ..data.dataset import epoch_batches
from ..data.latents import CachedLatent
from ..models.sdxl import SDXL, Prediction
from ..recipe import Recipe
from .conditioning import encode_text, size_ids, tokenize
from .noise import add_noise, multires_noise, training_target
from .precision import Precision


@dataclass
class TrainingData:
    """The cached dataset as epochs see it: an N_name/ subfolder's images appear N times."""

    latents: list[CachedLatent]  # per dataset item
    captions: list[str]  # per dataset item
    items: list[int]  # per epoch slot: its dataset item
    batch_size: int
    seed: int
    buckets: list[tuple[int, int]] = field(init=False)
    num_batches: int = field(init=False)  # per epoch
    _epoch: tuple[int, list[list[int]]] = field(
        init=False, default=(-1, [])
    )  # the epoch's batches, one epoch at a time

    def __post_init__(self):
        self.buckets = [self.latents[i].target_size for i in self.items]
        self.num_batches = len(epoch_batches(self.buckets, self.batch_size, self.seed, 0))

    def members(self, g: int) -> list[int]:
        """The dataset items of global micro-batch `g`."""
        epoch, index = divmod(g, self.num_batches)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.buckets, self.batch_size, self.seed, epoch))
        return [self.items[i] for i in self._epoch[1][index]]


def generators(seed: int, g: int, device: torch.device) -> tuple[random.Random, torch.Generator]:
    """Micro-batch `g`'s two generators: Python's (flips, caption order and dropout, pyramid noise
    scales) and torch's (noise, timesteps), both seeded by (seed, g) alone."""
    key = f"{seed}/{g}"
    torch_seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
    return random.Random(key), torch.Generator(device).manual_seed(torch_seed)


def micro_batch_loss(
    model: SDXL,
    data: TrainingData,
    g: int,
    recipe: Recipe,
    ac: torch.Tensor,
    *,
    precision: Precision,
    prediction: Prediction,
    train_te: bool,
    device: torch.device,
) -> torch.Tensor:
    """The mean denoising loss of micro-batch `g` under the model's current adapters, against
    the target `prediction` names (ε, or v for a v-pred base) on the schedule `ac`."""
    rng, gen = generators(recipe.seed, g, device)
    x0, captions, orig, crop, target = [], [], [], [], []
    for i in data.members(g):
        cached = data.latents[i]
        flip = recipe.flip_aug and rng.random() < 0.5
        x0.append(cached.flipped if flip else cached.latent)
        captions.append(
            process_caption(
                data.captions[i],
                rng,
                shuffle=recipe.shuffle_caption,
                keep_tokens=recipe.keep_tokens,
                dropout_rate=recipe.caption_dropout_rate,
                tag_dropout_rate=recipe.caption_tag_dropout_rate,
            )
        )
        orig.append(cached.original_size)
        crop.append(cached.crop_top_left)
        target.append(cached.target_size)
    x0 = torch.stack(x0).to(device) * model.vae.config.scaling_factor
    noise = multires_noise(
        tuple(x0.shape), recipe.multires_noise_iterations, recipe.multires_noise_discount, gen, rng, device
    )
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
            added_cond_kwargs={
                "text_embeds": pooled.to(precision.weights),
                "time_ids": time_ids.to(precision.weights),
            },
        ).sample
    target = training_target(x0, noise, t, ac, v_prediction=prediction.v)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
