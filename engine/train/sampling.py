"""Sample images during training: euler_a with classifier-free guidance, as kohya's sampler does.

A v-prediction model is sampled as diffusers samples it (prediction_type v_prediction); on the
zero-terminal-SNR schedule the steps are spaced "trailing", so the first one starts from pure
noise, and CFG is rescaled (guidance_rescale), both as that schedule's paper prescribes.
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..data.prompts import SamplePrompt
from ..models.sdxl import SDXL, Prediction
from .conditioning import encode_text, size_ids, tokenize

# Lin et al. (2023) §3.4: φ = 0.7 keeps CFG from overexposing a zero-SNR model's pictures.
ZTSNR_GUIDANCE_RESCALE = 0.7


def scheduler_config(model: SDXL, prediction: Prediction) -> dict:
    """The model's euler_a config for `prediction`. diffusers' rescale_betas_zero_snr puts the
    last ᾱ at 2⁻²⁴ instead of 0, so the first sigma is large (4096) but finite: no step divides by zero."""
    config = dict(model.config.scheduler)
    if prediction.v:
        config["prediction_type"] = "v_prediction"
    if prediction.ztsnr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def rescale_guidance(guided: torch.Tensor, text: torch.Tensor, rescale: float) -> torch.Tensor:
    """diffusers' guidance_rescale: move the guided prediction's per-sample std back towards the
    text-conditioned one's, by the fraction `rescale` (0 is plain CFG)."""
    if rescale == 0:
        return guided
    dims = list(range(1, guided.ndim))
    matched = guided * (text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1 - rescale) * guided


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


class Render:
    """Prompts being rendered, a denoising step at a time, so that a caller can stop between
    steps (a cancel, a stop) or interleave them with training steps (previews). The result does
    not depend on how the steps are spread out, nor on which prompts share a batch: all
    randomness comes from each prompt's own generator, never from the global RNGs.

    Several prompts (of one size, step count and CFG) render as one batch: on a small model the
    UNet's cost is mostly per call, so a batch of 32 costs a few times one prompt, not 32 times."""

    @torch.no_grad()
    def __init__(
        self,
        model: SDXL,
        *prompts: SamplePrompt,
        device: torch.device,
        dtype: torch.dtype,
        default_seed: int,
        prediction: Prediction | None = None,
    ):
        """`default_seed + i`: the seed of the i-th prompt when it has none; `prediction`: what
        the UNet predicts, when a recipe overrides the checkpoint's (model.prediction)."""
        from diffusers import EulerAncestralDiscreteScheduler

        first = prompts[0]
        if any(
            (p.width, p.height, p.steps, p.cfg) != (first.width, first.height, first.steps, first.cfg)
            for p in prompts
        ):
            raise ValueError("prompts rendered together need one size, step count and CFG")
        self.model, self.cfg, self.dtype = model, first.cfg, dtype
        prediction = prediction or model.prediction
        self.guidance_rescale = ZTSNR_GUIDANCE_RESCALE if prediction.ztsnr else 0.0
        self.scheduler = EulerAncestralDiscreteScheduler.from_config(scheduler_config(model, prediction))
        self.scheduler.set_timesteps(first.steps, device=device)
        self.generators = [
            torch.Generator(device).manual_seed(p.seed if p.seed is not None else default_seed + i)
            for i, p in enumerate(prompts)
        ]
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=dtype))
            if device.type == "cuda" and dtype != torch.float32
            else contextlib.nullcontext
        )
        # One batch of the negatives, then one of the prompts: the UNet sees [uncond…, text…].
        ids1, ids2 = tokenize(model, [p.negative for p in prompts] + [p.prompt for p in prompts], device)
        with self.autocast():
            context, pooled = encode_text(model, ids1, ids2)
        h, w, rows = first.height, first.width, 2 * len(prompts)
        ids = size_ids([(h, w)] * rows, [(0, 0)] * rows, [(h, w)] * rows, device)
        self.context = context.to(dtype)
        self.cond = {"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)}
        noise = [torch.randn((1, 4, h // 8, w // 8), generator=g, device=device) for g in self.generators]
        self.latents = torch.cat(noise) * self.scheduler.init_noise_sigma
        self.timesteps = list(self.scheduler.timesteps)
        self.done = 0

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @torch.no_grad()
    def step(self) -> None:
        """One denoising step. The text was encoded with the weights the model had at the start:
        a caller that patches the model between steps must patch it the same way each time."""
        t = self.timesteps[self.done]
        x = self.scheduler.scale_model_input(torch.cat([self.latents, self.latents]), t)
        with self.autocast():
            out = self.model.unet(
                x.to(self.dtype), t, self.context, added_cond_kwargs=self.cond
            ).sample.float()  # ε or v
        uncond, text = out.chunk(2)
        guided = rescale_guidance(uncond + self.cfg * (text - uncond), text, self.guidance_rescale)
        # a list of generators: each prompt's ancestral noise comes from its own
        self.latents = self.scheduler.step(guided, t, self.latents, generator=self.generators).prev_sample
        self.done += 1

    def run(self, check: Callable[[], None] | None = None) -> Render:
        """Every step left; `check` is called before each: it raises to stop (a cancel, a stop)."""
        while not self.finished:
            if check is not None:
                check()
            self.step()
        return self

    def images(self) -> list[Image.Image]:
        return decode_all(self.model, self.latents)

    def image(self) -> Image.Image:
        return decode(self.model, self.latents)  # a render of one prompt


def sample(
    model: SDXL,
    prompt: SamplePrompt,
    *,
    device: torch.device,
    dtype: torch.dtype,
    default_seed: int,
    check: Callable[[], None] | None = None,
    prediction: Prediction | None = None,
) -> Image.Image:
    """Render one prompt. The UNet runs in `dtype` (under autocast on CUDA), the VAE in fp32.
    `check` is called before every denoising step: it raises to stop (a cancel, a stop)."""
    render = Render(
        model, prompt, device=device, dtype=dtype, default_seed=default_seed, prediction=prediction
    )
    return render.run(check).image()


def decode(model: SDXL, latents: torch.Tensor) -> Image.Image:
    """The picture of a batch of one latent."""
    (image,) = decode_all(model, latents)
    return image


@torch.no_grad()
def decode_all(model: SDXL, latents: torch.Tensor) -> list[Image.Image]:
    """One picture per latent of the batch; the VAE runs in fp32."""
    vae = model.vae
    x = vae.decode(
        latents.to(device=next(vae.parameters()).device, dtype=torch.float32) / vae.config.scaling_factor
    ).sample
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(one.permute(1, 2, 0).cpu().numpy()) for one in x]
