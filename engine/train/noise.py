"""The diffusion objective's pieces: the DDPM schedule (optionally rescaled to zero terminal SNR),
the training target (ε or v), and multires (pyramid) noise."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000


def alphas_cumprod(
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    steps: int = NUM_TRAIN_TIMESTEPS,
    *,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """SD's "scaled linear" betas (linear in √β), as fp64 for an exact product, returned fp32;
    with `zero_terminal_snr`, rescaled so that the last step is pure noise."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    return (rescale_zero_terminal_snr(ac) if zero_terminal_snr else ac).float()


def rescale_zero_terminal_snr(ac: torch.Tensor) -> torch.Tensor:
    """Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Algorithm 1):
    shift √ᾱ so its last value is 0 and scale it so its first value is kept. SD's schedule ends
    at ᾱ ≈ 0.0047, so a model never saw pure noise and cannot make very dark or bright pictures;
    the zero-SNR checkpoints (NoobAI v-pred, …) were trained on this one. kohya and diffusers
    rescale the betas instead; the ᾱ they imply is this one, and the last ᾱ is exactly 0."""
    root = ac.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * (first / (first - last))) ** 2


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor, *, v_prediction: bool
) -> torch.Tensor:
    """What the UNet learns to predict of x_t = √ᾱ·x0 + √(1−ᾱ)·ε: ε itself, or the velocity
    v = √ᾱ·ε − √(1−ᾱ)·x0 of a v-prediction model (Salimans & Ho; diffusers' get_velocity)."""
    if not v_prediction:
        return noise
    a = ac.to(x0.device)[t].view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


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
