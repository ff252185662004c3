"""The diffusion objective's pieces: the DDPM schedule, timesteps, and multires (pyramid) noise."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """SD's "scaled linear" betas (linear in √β), as fp64 for an exact product, returned fp32."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, per sample."""
    a = ac.to(x0.device)[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def multires_noise(
    shape: tuple[int, int, int, int],
    iterations: int,
    discount: float,
    generator: torch.Generator,
    rng: random.Random,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Pyramid noise: N(0, I) plus upsampled coarser noise at random scale factors r ~ U[2, 4),
    weighted discount**i, stopping once a side reaches 1; rescaled to unit std over the batch.

    With iterations=0 this is plain Gaussian noise. i = 0 adds a second full-resolution draw of
    weight 1, as kohya's implementation does.
    """
    b, c, h, w = shape
    noise = torch.randn(shape, generator=generator, device=device)
    if iterations == 0:
        return noise
    for i in range(iterations):
        r = rng.random() * 2 + 2
        sh, sw = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, sh, sw), generator=generator, device=device)
        noise += F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if sh == 1 or sw == 1:
            break
    return noise / noise.std()
