"""The seed recipe at full SDXL size on one GPU, against the card's limits. One prepared command:

    python bench/gpu_bench.py                 # on a GPU machine: ≤ 9 minutes, JSON in bench/results/
    python bench/gpu_bench.py --tiny          # on a CPU, the tiny twin, seconds: keeps it from rotting

What it does: writes a random full-size SDXL single file from the bundled configs (never
committed; removed afterwards), loads it in bf16 as the daemon does, makes 48 synthetic 1024×1024
captioned images (one update's worth), and measures with the real engine:
  - latent caching: images/s at 1024 (the VAE in fp32, flips included);
  - the seed recipe (batch 8, accumulation 6, bf16 autocast, gradient checkpointing, LoCon
    rank 8 / conv 256, ClybW): step time, samples/s, achieved TFLOP/s and the share of the card's
    dense bf16 peak (forward counted at 6.76 TFLOP per 1024² image, the backward at the same
    again; checkpointing's recompute not counted), peak VRAM;
  - the same with a LoRA and the training state saved after every step (save_every_n_steps=1);
  - seconds per sample image (1024², euler_a, 30 steps, CFG).
Targets (issue 7, one H100): ≥ 25 samples/s, ≥ 45 % of bf16 peak, ≤ 20 GiB VRAM, saving ≤ 5 %.
`--channels-last` and `--compile` try those optimisations (kept off until a run shows they pay).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.load_bench import build_checkpoint  # noqa: E402
from bench.rows import row, table  # noqa: E402
from loradrop.engine.data.dataset import scan  # noqa: E402
from loradrop.engine.data.latents import LatentCache  # noqa: E402
from loradrop.engine.data.prompts import SamplePrompt  # noqa: E402
from loradrop.engine.events import Progress  # noqa: E402
from loradrop.engine.models.sdxl import load_sdxl  # noqa: E402
from loradrop.engine.recipe import Recipe  # noqa: E402
from loradrop.engine.train.loop import train  # noqa: E402
from loradrop.engine.train.sampling import sample  # noqa: E402

UNET_TFLOP_PER_IMAGE = 6.76  # forward, 1024x1024 (FlopCounterMode, checked-here.md)
# Dense bf16 tensor-core peaks (TFLOP/s), by a substring of the device name.
BF16_PEAK = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "A10": 125.0,
    "L4": 121.0,
}
RESULTS = Path(__file__).resolve().parent / "results"


def make_images(folder: Path, n: int, size: int) -> Path:
    """n captioned pictures: coloured shapes on noise, so the VAE sees real structure."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(n):
        img = Image.effect_noise((size, size), 40).convert("RGB")
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(size // 16, size // 4)
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"zkw thing, shapes, number {i}, {'red' if i % 2 else 'blue'}\n")
    return folder


def step_times(model, dataset, out: Path, cache: Path, recipe: Recipe, device) -> tuple[list[float], float]:
    stamps: list[float] = []

    def emit(event):
        if isinstance(event, Progress) and event.stage == "train":
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(model, dataset, out, recipe, device=device, cache_dir=cache, emit=emit)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return [b - a for a, b in zip(stamps, stamps[1:])], peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny twin on whatever device there is (a CPU is fine)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer updates per timed run (default 8; tiny 3)"
    )
    parser.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet's blocks")
    parser.add_argument("--out", type=Path, help="JSON result path (default bench/results/<card>.json)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    steps = args.steps or (3 if args.tiny else 8)
    size = 64 if args.tiny else 1024
    root = Path(tempfile.mkdtemp(prefix="loradrop-gpu-bench-"))
    try:
        ckpt = root / "sdxl.safetensors"
        build_checkpoint(ckpt, args.tiny)
        seed = Recipe()
        overrides = {
            "max_train_steps": steps,
            "sample_every_n_steps": 0,
            "save_every_n_steps": 0,
            "log_with": "none",
        }
        if args.tiny:
            overrides.update(
                resolution=64,
                min_bucket_reso=32,
                max_bucket_reso=128,
                train_batch_size=2,
                gradient_accumulation_steps=1,
            )
        recipe = seed.updated(overrides)
        weights = torch.bfloat16 if device.type == "cuda" else torch.float32
        t = time.perf_counter()
        model = load_sdxl(ckpt, dtype=weights, vae_dtype=torch.float32)
        for part in ("unet", "te1", "te2", "vae"):
            model.component(part).to(device)
        load_s = time.perf_counter() - t
        if args.channels_last:
            model.unet.to(memory_format=torch.channels_last)
        if args.compile:
            model.unet.compile()

        per_update = recipe.train_batch_size * recipe.gradient_accumulation_steps
        data = make_images(root / "data", per_update, size)
        dataset = scan(data, recipe)
        cache = root / "cache"
        t = time.perf_counter()
        LatentCache(cache, model.vae, model.vae_id, device).ensure(dataset.items)
        if device.type == "cuda":
            torch.cuda.synchronize()
        cache_rate = len(dataset.items) / (time.perf_counter() - t)

        plain, peak_gib = step_times(model, dataset, root / "plain", cache, recipe, device)
        saving, _ = step_times(
            model, dataset, root / "saving", cache, recipe.updated({"save_every_n_steps": 1}), device
        )
        step = statistics.median(plain[1:] or plain)
        step_saving = statistics.median(saving[1:] or saving)
        samples_per_s = per_update / step
        tflops = samples_per_s * 2 * UNET_TFLOP_PER_IMAGE * (size / 1024) ** 2
        peak = next((v for k, v in BF16_PEAK.items() if k in card), None) if device.type == "cuda" else None

        prompt = SamplePrompt("zkw thing, shapes", width=size, height=size, steps=30 if not args.tiny else 4)
        t = time.perf_counter()
        sample(model, prompt, device=device, dtype=weights, default_seed=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sample_s = time.perf_counter() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)

    share = tflops / peak if peak else None
    result = {
        "card": card,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "resolution": size,
        "batch": recipe.train_batch_size,
        "accumulation": recipe.gradient_accumulation_steps,
        "steps_timed": steps,
        "load_s": load_s,
        "latent_cache_images_per_s": cache_rate,
        "step_s": step,
        "step_s_saving_every_step": step_saving,
        "saving_overhead": step_saving / step - 1,
        "samples_per_s": samples_per_s,
        "achieved_tflops": tflops,
        "bf16_peak_tflops": peak,
        "share_of_peak": share,
        "peak_vram_gib": peak_gib,
        "sample_image_s": sample_s,
        "wall_s": time.perf_counter() - started,
    }
    rows = [
        row("samples/s (seed recipe)", samples_per_s, "/s", "≥ 25 on one H100"),
        row(
            "achieved TFLOP/s (fwd+bwd)",
            tflops,
            "TFLOP/s",
            f"≥ 45% of peak (is {100 * share:.0f}%)" if share else "-",
            peak,
            "card's bf16 peak",
        ),
        row("peak VRAM", peak_gib, "GiB", "≤ 20 GiB"),
        row(
            "step time, saving every step",
            step_saving,
            "s",
            f"≤ 1.05× (is {step_saving / step:.3f}×)",
            step,
            "no saving",
        ),
        row("latent caching", cache_rate, "img/s", "-"),
        row("one sample image (30 steps, CFG)", sample_s, "s", "-"),
    ]
    print(table(rows))
    out = (
        args.out or RESULTS / f"{card.replace(' ', '-').replace('/', '-')}{'-tiny' if args.tiny else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
