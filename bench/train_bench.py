"""The trainer's overhead on the tiny twin: its step time against a bare loop, and saving every step.

    python bench/train_bench.py [--steps 12] [--json OUT]

Three runs of the same work (same model, LoCon, ClybW, batch, images, noise recipe):
  bare     a hand-written loop: fixed latents and captions, forward, backward, clip, step;
  trainer  `engine.train.loop.train` without saving (data order, flips, caption shuffling,
           multires noise, events, lr schedule: everything the recipe does);
  saving   the trainer saving a LoRA and the training state after every step (the seed's
           save_every_n_steps=1).
Step times are medians over the steps after the first. Targets (issue 3): trainer ≤ 1.1× bare,
saving ≤ 1.05× trainer.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.rows import row, table, write_rows  # noqa: E402
from loradrop.engine.data.dataset import scan  # noqa: E402
from loradrop.engine.events import Progress  # noqa: E402
from loradrop.engine.models.sdxl import load_sdxl  # noqa: E402
from loradrop.engine.models.tiny import default_model_path  # noqa: E402
from loradrop.engine.recipe import Recipe  # noqa: E402
from loradrop.engine.train.loop import train  # noqa: E402
from loradrop.testing import BUCKET_SIZES, TINY_RECIPE, make_dataset  # noqa: E402

CPU = torch.device("cpu")


def trainer_steps(model, data: Path, out: Path, cache: Path, recipe: Recipe) -> list[float]:
    stamps: list[float] = []

    def emit(event):
        if isinstance(event, Progress) and event.stage == "train":
            stamps.append(time.perf_counter())

    train(model, scan(data, recipe), out, recipe, device=CPU, cache_dir=cache, emit=emit)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def bare_steps(model, data: Path, cache: Path, recipe: Recipe) -> list[float]:
    from loradrop.engine.data.latents import LatentCache
    from loradrop.engine.train.clybw import ClybW
    from loradrop.engine.train.conditioning import encode_text, size_ids, tokenize
    from loradrop.engine.train.network import LoConNetwork
    from loradrop.engine.train.noise import add_noise, alphas_cumprod

    dataset = scan(data, recipe)
    cached = LatentCache(cache, model.vae, model.vae_id, CPU).ensure(dataset.items)
    same = [i for i, c in enumerate(cached) if c.target_size == cached[0].target_size][
        : recipe.train_batch_size
    ]
    x0 = torch.stack([cached[i].latent for i in same]) * model.vae.config.scaling_factor
    captions = [dataset.items[i].caption for i in same]
    ids = size_ids(
        [cached[i].original_size for i in same],
        [cached[i].crop_top_left for i in same],
        [cached[i].target_size for i in same],
        CPU,
    )
    torch.manual_seed(recipe.seed)
    net = LoConNetwork(model, recipe)
    net.apply_to()
    groups = net.param_groups(recipe)
    params = [p for g in groups for p in g["params"]]
    opt = ClybW(groups, lr=recipe.learning_rate, foreach=True)
    ac = alphas_cumprod()
    times = []
    try:
        for _ in range(recipe.max_train_steps):
            start = time.perf_counter()
            for _ in range(recipe.gradient_accumulation_steps):
                noise = torch.randn_like(x0)
                t = torch.randint(0, 1000, (x0.shape[0],))
                context, pooled = encode_text(model, *tokenize(model, captions, CPU))
                pred = model.unet(
                    add_noise(x0, noise, t, ac),
                    t,
                    context,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids},
                ).sample
                (torch.nn.functional.mse_loss(pred, noise) / recipe.gradient_accumulation_steps).backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    finally:
        net.restore()
    return times[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="loradrop-train-bench-"))
    try:
        data = make_dataset(root / "data", images=8, sizes=BUCKET_SIZES)
        settings = {
            **TINY_RECIPE,
            "max_train_steps": args.steps,
            "train_batch_size": 2,
            "save_every_n_steps": 0,
            "multires_noise_iterations": 12,
            "flip_aug": True,
            "shuffle_caption": True,
        }
        recipe = Recipe.from_mapping(settings)
        model = load_sdxl(default_model_path())
        cache = root / "cache"
        bare = statistics.median(bare_steps(model, data, cache, recipe))
        plain = statistics.median(trainer_steps(model, data, root / "plain", cache, recipe))
        saving = statistics.median(
            trainer_steps(model, data, root / "saving", cache, recipe.updated({"save_every_n_steps": 1}))
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        row(
            "trainer step (tiny twin, batch 2)",
            plain,
            "s",
            f"≤ 1.1× bare (is {plain / bare:.3f}×)",
            bare,
            "bare loop",
        ),
        row(
            "trainer step, saving every step",
            saving,
            "s",
            f"≤ 1.05× (is {saving / plain:.3f}×)",
            plain,
            "no saving",
        ),
    ]
    print(table(rows))
    write_rows(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
