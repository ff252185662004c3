"""Sample images during training: euler_a with classifier-free guidance, as kohya's sampler does."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from PIL import Image

from ..data.prompts import SamplePrompt
from ..models.sdxl import SDXL
from .conditioning import encode_text, size_ids, tokenize


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Sampling must not change training: every global RNG is put back afterwards."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


@torch.no_grad()
def sample(model: SDXL, prompt: SamplePrompt, *, device: torch.device, dtype: torch.dtype, default_seed: int) -> Image.Image:
    """Render one prompt. The UNet runs in `dtype` (under autocast on CUDA), the VAE in fp32."""
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler.from_config(model.config.scheduler)
    scheduler.set_timesteps(prompt.steps, device=device)
    seed = prompt.seed if prompt.seed is not None else default_seed
    generator = torch.Generator(device).manual_seed(seed)

    ids1, ids2 = tokenize(model, [prompt.negative, prompt.prompt], device)
    autocast = torch.autocast(device.type, dtype=dtype) if device.type == "cuda" and dtype != torch.float32 else contextlib.nullcontext()
    with autocast:
        context, pooled = encode_text(model, ids1, ids2)
    h, w = prompt.height, prompt.width
    ids = size_ids([(h, w)] * 2, [(0, 0)] * 2, [(h, w)] * 2, device)
    cond = {"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)}

    latents = torch.randn((1, 4, h // 8, w // 8), generator=generator, device=device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        with autocast:
            eps = model.unet(x.to(dtype), t, context.to(dtype), added_cond_kwargs=cond).sample.float()
        uncond, text = eps.chunk(2)
        guided = uncond + prompt.cfg * (text - uncond)
        latents = scheduler.step(guided, t, latents, generator=generator).prev_sample
    return decode(model, latents)


@torch.no_grad()
def decode(model: SDXL, latents: torch.Tensor) -> Image.Image:
    vae = model.vae
    x = vae.decode(latents.to(device=next(vae.parameters()).device, dtype=torch.float32) / vae.config.scaling_factor).sample
    x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())
