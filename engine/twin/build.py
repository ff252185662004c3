"""Train the learnable twin: a tiny SDXL that draws the world of coloured shapes from its captions.

    python -m loradrop.engine.twin.build --work ~/twin-work [--out FILE] [--scale 0.01]

Phases, each resumable: the VAE learns to reconstruct the world (then is rescaled so SDXL's own
scaling factor gives unit-variance latents), the world is encoded once, the UNet learns to draw
it (epsilon prediction, SDXL's schedule and size ids, conditioned through both of the random
twin's text encoders), and the EMA weights are written as an fp16 single-file SGM checkpoint,
judged, and described in a manifest beside it. State is saved to --work every few minutes and on
SIGTERM or Ctrl-C; running the same command again continues where it stopped, to the same weights:
every step draws its randomness from a generator seeded by the step number, not from a stream.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SCRIPT_VERSION = "1"
# The manifest hashes what makes the weights; the judge only reads them, so it may change alone.
SCRIPT_FILES = ("build.py", "world.py")


@dataclass(frozen=True)
class Settings:
    seed: int = 20261203
    pool: int = 8192  # world pictures both models train on
    vae_widths: tuple[int, ...] = (16, 32, 64, 64)
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    unet_steps: int = 5000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.9995
    caption_dropout: float = 0.1  # empty captions, so classifier-free guidance has an unconditional
    min_snr_gamma: float = 5.0
    save_every_s: float = 300.0
    eval_samples: int = 48
    eval_steps: int = 20
    eval_cfg: float = 5.0

    def scaled(self, scale: float) -> "Settings":
        """A short run of the same script (the test's), every step count times `scale`."""
        n = lambda v: max(2, round(v * scale))  # noqa: E731
        return dataclasses.replace(
            self,
            pool=n(self.pool),
            vae_steps=n(self.vae_steps),
            unet_steps=n(self.unet_steps),
            warmup=n(self.warmup),
            eval_samples=n(self.eval_samples),
        )


def step_generator(settings: Settings, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(settings.seed * 7919 + phase * 1_000_003 + step)


def twin_config(settings: Settings):
    from ..models.configs import tiny_config

    config = tiny_config()
    config.vae.update(block_out_channels=list(settings.vae_widths))
    return config


# --- the world, as tensors ----------------------------------------------------------------------


def world_pool(settings: Settings):
    """The pictures of every colour the judge knows: the VAE must be able to write a colour the
    UNet never drew (the LoRA's concept), as SDXL's VAE can write any colour."""
    from . import world

    scenes = world.scenes(settings.pool, settings.seed, world.BASE_COLOURS + world.NOVEL_COLOURS)
    pixels = np.stack([np.asarray(world.render(s)) for s in scenes])  # N, H, W, 3 uint8
    return scenes, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1


# --- state on disk --------------------------------------------------------------------------------


class State:
    """Everything a resumed run needs, saved atomically as one torch file."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = (
            torch.load(path, weights_only=False) if path.exists() else {"phase": "vae", "step": 0, "log": []}
        )
        self.saved_at = time.monotonic()

    def save(self) -> None:
        tmp = self.path.with_suffix(".partial")
        torch.save(self.data, tmp)
        os.replace(tmp, self.path)
        self.saved_at = time.monotonic()

    def due(self, settings: Settings) -> bool:
        return time.monotonic() - self.saved_at > settings.save_every_s


class Stop:
    """SIGTERM and Ctrl-C ask the loop to save and leave at the next step."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            cls.requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def report(phase: str, step: int, total: int, loss: float, started: float, first: int) -> None:
    done = step - first
    rate = (time.monotonic() - started) / max(done, 1)
    print(
        f"{phase} {step}/{total} loss {loss:.4f} {rate:.2f} s/step eta {rate * (total - step) / 60:.0f} min",
        flush=True,
    )


# --- phase 1: the VAE -----------------------------------------------------------------------------


def train_vae(settings: Settings, state: State, pixels: torch.Tensor, config):
    from diffusers import AutoencoderKL

    torch.manual_seed(settings.seed)
    vae = AutoencoderKL.from_config(config.vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    if "vae" in state.data:
        vae.load_state_dict(state.data["vae"])
        opt.load_state_dict(state.data["vae_opt"])
    first, started = state.data["step"], time.monotonic()
    for step in range(first, settings.vae_steps):
        if Stop.requested:
            break
        g = step_generator(settings, 1, step)
        x = to_unit(pixels[torch.randint(len(pixels), (settings.vae_batch,), generator=g)])
        lr = settings.vae_lr * 0.5 * (1 + math.cos(math.pi * step / settings.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = (
            F.l1_loss(recon, x)
            + F.mse_loss(recon, x)
            + settings.kl_weight * posterior.kl().mean() / z[0].numel()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        state.data["step"] = step + 1
        if step % 50 == 0 or step + 1 == settings.vae_steps:
            state.data["log"].append(("vae", step, loss.item()))
            report("vae", step + 1, settings.vae_steps, loss.item(), started, first)
        if state.due(settings):
            state.data.update(vae=vae.state_dict(), vae_opt=opt.state_dict())
            state.save()
    state.data.update(vae=vae.state_dict(), vae_opt=opt.state_dict())
    if not Stop.requested:
        rescale_latents(vae, pixels, config)
        state.data.update(phase="unet", step=0, vae=vae.state_dict(), vae_opt=None)
    state.save()
    return vae


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        posterior = vae.encode(to_unit(pixels[i : i + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def rescale_latents(vae, pixels: torch.Tensor, config) -> None:
    """Scale the latent space by k so that SDXL's own scaling factor (0.13025) gives the world's
    latents unit variance: the encoder's mean times k (its log-variance plus 2 ln k), the
    decoder's input divided by k. Exact: the decoded pictures do not change."""
    mean, _ = encode(vae, pixels[:1024])
    k = 1.0 / (config.vae["scaling_factor"] * mean.std().item())
    quant, post = vae.quant_conv, vae.post_quant_conv
    c = quant.out_channels // 2
    quant.weight[:c] *= k
    quant.bias[:c] *= k
    quant.bias[c:] += 2 * math.log(k)
    post.weight /= k
    print(f"vae latents rescaled by {k:.3f}", flush=True)


# --- phase 2: the UNet ----------------------------------------------------------------------------


@torch.no_grad()
def caption_table(model, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every caption the world has, through both text encoders once: they are frozen."""
    from ..train.conditioning import encode_text, tokenize

    ids1, ids2 = tokenize(model, captions, "cpu")
    context, pooled = encode_text(model, ids1, ids2)
    return {c: (context[i], pooled[i]) for i, c in enumerate(captions)}


def train_unet(
    settings: Settings,
    state: State,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    table,
    config,
):
    from diffusers import UNet2DConditionModel

    from ..train.conditioning import size_ids
    from ..train.noise import NUM_TRAIN_TIMESTEPS, add_noise, alphas_cumprod

    torch.manual_seed(settings.seed + 1)
    unet = UNet2DConditionModel.from_config(config.unet)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=settings.unet_lr, weight_decay=0.01)
    if "unet" in state.data:
        unet.load_state_dict(state.data["unet"])
        ema.load_state_dict(state.data["ema"])
        opt.load_state_dict(state.data["unet_opt"])
    ac = alphas_cumprod()
    snr = ac / (1 - ac)
    mean, std = latents
    scale = config.vae["scaling_factor"]
    side = mean.shape[-1] * 8
    ids = size_ids(
        [(side, side)] * settings.unet_batch,
        [(0, 0)] * settings.unet_batch,
        [(side, side)] * settings.unet_batch,
        "cpu",
    )
    first, started = state.data["step"], time.monotonic()
    for step in range(first, settings.unet_steps):
        if Stop.requested:
            break
        g = step_generator(settings, 2, step)
        pick = torch.randint(len(mean), (settings.unet_batch,), generator=g)
        x0 = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=g)) * scale
        drop = torch.rand(settings.unet_batch, generator=g) < settings.caption_dropout
        chosen = ["" if d else captions[i] for d, i in zip(drop.tolist(), pick.tolist())]
        context = torch.stack([table[c][0] for c in chosen])
        pooled = torch.stack([table[c][1] for c in chosen])
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (settings.unet_batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        lr = (
            settings.unet_lr
            * min(1.0, (step + 1) / settings.warmup)
            * (0.55 + 0.45 * math.cos(math.pi * step / settings.unet_steps))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        eps = unet(
            add_noise(x0, noise, t, ac),
            t,
            context,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
        ).sample
        # min-SNR weighting: the easy, low-noise steps stop drowning out the ones that shape a picture
        weight = torch.clamp(snr[t], max=settings.min_snr_gamma) / snr[t]
        loss = (weight * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(settings.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        state.data["step"] = step + 1
        if step % 50 == 0 or step + 1 == settings.unet_steps:
            state.data["log"].append(("unet", step, loss.item()))
            report("unet", step + 1, settings.unet_steps, loss.item(), started, first)
        if state.due(settings):
            state.data.update(unet=unet.state_dict(), ema=ema.state_dict(), unet_opt=opt.state_dict())
            state.save()
    state.data.update(unet=unet.state_dict(), ema=ema.state_dict(), unet_opt=opt.state_dict())
    if not Stop.requested:
        state.data.update(phase="write", step=0)
    state.save()
    return ema


# --- phase 3: write, judge, describe --------------------------------------------------------------


def evaluate(path: Path, settings: Settings) -> dict:
    """Judge the written file as a user's loader reads it: VAE round trips and prompted samples."""
    from ..data.prompts import SamplePrompt
    from ..models.sdxl import load_sdxl
    from ..train.sampling import decode, sample
    from . import judge, world

    model = load_sdxl(path)
    test = world.scenes(settings.eval_samples, settings.seed + 99)
    pixels = torch.from_numpy(np.stack([np.asarray(world.render(s)) for s in test])).permute(0, 3, 1, 2)
    mean, _ = encode(model.vae, pixels)
    scale = model.vae.config.scaling_factor
    round_trip = [judge.judge(decode(model, mean[i : i + 1] * scale)) for i in range(len(test))]
    drawn = [
        judge.judge(
            sample(
                model,
                SamplePrompt(
                    s.caption,
                    width=world.SIZE,
                    height=world.SIZE,
                    seed=i,
                    steps=settings.eval_steps,
                    cfg=settings.eval_cfg,
                ),
                device=torch.device("cpu"),
                dtype=torch.float32,
                default_seed=i,
            )
        )
        for i, s in enumerate(test)
    ]

    def share(verdicts, *fields):
        return sum(all(getattr(v, f) == getattr(s, f) for f in fields) for v, s in zip(verdicts, test)) / len(
            test
        )

    return {
        "vae_round_trip": {
            "colour": share(round_trip, "colour"),
            "shape": share(round_trip, "shape"),
            "all": share(round_trip, "colour", "shape", "background"),
        },
        "samples": {
            "colour": share(drawn, "colour"),
            "shape": share(drawn, "shape"),
            "background": share(drawn, "background"),
            "all": share(drawn, "colour", "shape", "background"),
        },
        "eval": f"{len(test)} held-out captions, euler_a {settings.eval_steps} steps, CFG {settings.eval_cfg:g}, {world.SIZE} px",
    }


def script_hash() -> str:
    """The scripts' code as Python reads it: the hash of their syntax trees, so a reformat or a
    comment does not ask for a retrain, and any change to what runs does."""
    h = hashlib.sha256()
    for name in SCRIPT_FILES:
        h.update(ast.dump(ast.parse((Path(__file__).parent / name).read_text())).encode())
    return h.hexdigest()


def write_twin(out: Path, settings: Settings, state: State, config, te_states, vae_state, ema) -> dict:
    from ..models.tiny import write_checkpoint

    states = {"unet": ema.state_dict(), "vae": vae_state, **te_states}
    write_checkpoint(
        out, config, states, {"loradrop.learned_twin": f"version={SCRIPT_VERSION} seed={settings.seed}"}
    )
    figures = evaluate(out, settings)
    log = state.data["log"]
    last = lambda phase: float(np.mean([l for p, _, l in log if p == phase][-10:]))  # noqa: E731, E741
    manifest = {
        "script_version": SCRIPT_VERSION,
        "script_tree_sha256": script_hash(),
        "settings": dataclasses.asdict(settings),
        "file_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads",
        "train_seconds": round(state.data.get("seconds", 0.0)),
        "final_loss": {"vae": last("vae"), "unet": last("unet")},
        "figures": figures,
    }
    out.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def text_encoder_states() -> dict[str, dict[str, torch.Tensor]]:
    """The random twin's encoders, kept frozen: the learned twin reads captions through them."""
    from ..models.sdxl import load_sdxl
    from ..models.tiny import default_random_path

    random_twin = load_sdxl(default_random_path(), components=("te1", "te2"))
    return {"te1": random_twin.te1.state_dict(), "te2": random_twin.te2.state_dict()}


def snapshot(state: State, settings: Settings, out: Path) -> int:
    """A look at a run in progress, without disturbing it: its last saved EMA weights."""
    from ..models.tiny import write_checkpoint

    if "ema" not in state.data:
        sys.exit(
            f"{state.path} has no UNet weights yet (phase {state.data['phase']}); try again once the UNet trains."
        )
    states = {"unet": state.data["ema"], "vae": state.data["vae"], **text_encoder_states()}
    write_checkpoint(
        out,
        twin_config(settings),
        states,
        {"loradrop.learned_twin": f"snapshot of step {state.data['step']}"},
    )
    print(f"wrote {out} (UNet step {state.data['step']} of {settings.unet_steps})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..models.sdxl import load_sdxl
    from ..models.tiny import default_random_path
    from . import world

    parser = argparse.ArgumentParser(
        prog="python -m loradrop.engine.twin.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--work", type=Path, required=True, help="folder for the resumable state (kept between runs)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the checkpoint to write (default: WORK/learned-twin.safetensors)",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every step count (a quick check: 0.01)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 leaves a core free; the same count and torch reproduce a run exactly)",
    )
    parser.add_argument(
        "--snapshot",
        type=Path,
        default=None,
        help="write the UNet's current EMA weights to this checkpoint and exit (training may go on)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    settings = Settings().scaled(args.scale) if args.scale != 1.0 else Settings()
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out or args.work / "learned-twin.safetensors"
    state = State(args.work / "state.pt")
    if state.data.get("settings", dataclasses.asdict(settings)) != dataclasses.asdict(settings):
        sys.exit(
            f"{args.work} holds a run with other settings; use another --work folder or delete {state.path}."
        )
    state.data["settings"] = dataclasses.asdict(settings)
    if args.snapshot:
        return snapshot(state, settings, args.snapshot)
    Stop.install()
    began, already = time.monotonic(), state.data.get("seconds", 0.0)

    config = twin_config(settings)
    scenes, pixels = world_pool(settings)
    if state.data["phase"] == "vae":
        train_vae(settings, state, pixels, config)
    if state.data["phase"] in ("unet", "write") and not Stop.requested:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config(config.vae)
        vae.load_state_dict(state.data["vae"])
        latents = encode(vae.eval(), pixels)
        random_twin = load_sdxl(default_random_path(), components=("te1", "te2"))
        captions = sorted(
            {
                world.caption(c, s, b)
                for c in world.BASE_COLOURS + world.NOVEL_COLOURS
                for s in world.SHAPES
                for b in world.BACKGROUNDS
            }
            | {""}
        )
        table = caption_table(random_twin, captions)
        # The UNet learns the base colours only: the novel ones are left for LoRAs to teach.
        drawn = torch.tensor([s.colour in world.BASE_COLOURS for s in scenes])
        latents = (latents[0][drawn], latents[1][drawn])
        ema = train_unet(
            settings,
            state,
            latents,
            [s.caption for s in scenes if s.colour in world.BASE_COLOURS],
            table,
            config,
        )
        state.data["seconds"] = already + time.monotonic() - began
        state.save()
        if state.data["phase"] == "write":
            manifest = write_twin(out, settings, state, config, text_encoder_states(), state.data["vae"], ema)
            print(json.dumps(manifest["figures"], indent=2))
            print(f"wrote {out} and {out.with_suffix('.json')}")
            return 0
    state.data["seconds"] = already + time.monotonic() - began
    state.save()
    print(f"stopped; state saved in {state.path}: run the same command again to continue", flush=True)
    return 3


if __name__ == "__main__":
    raise SystemExit(main())
