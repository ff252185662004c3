"""`loradrop train`: the seed recipe on one dataset folder, offline (no daemon)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .recipe import add_recipe_options, resolve_recipe


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoCon on a folder of captioned images (the seed's 80-step recipe)",
        description=(
            "Train an SDXL LyCORIS LoCon on DATASET (images with same-stem .txt captions, an "
            "optional sample-prompts.txt) with the seed recipe: 80 ClybW updates of 8x6 images, "
            "cosine schedule, multires noise, samples every 10 steps, a LoRA saved every step. "
            "Files are named after DATASET's folder (mychar.safetensors) unless output_name is set. "
            "Without --model it trains on the embedded tiny twin, which runs on a CPU. "
            "Under `accelerate launch --num_processes N` it trains data-parallel on N GPUs."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  loradrop train ./mychar --model ponyDiffusionV6XL.safetensors -o out/\n"
            "  loradrop train ./mychar -o out/ --set max_train_steps=40 --set network_dim=16\n"
            "  loradrop train ./mychar -o out/ --resume     # continue after a crash"
        ),
    )
    p.add_argument("dataset", metavar="DATASET", type=Path, help="folder of images and .txt captions")
    p.add_argument(
        "-o", "--out", metavar="OUTDIR", type=Path, required=True, help="where LoRAs, samples and logs go"
    )
    p.add_argument(
        "--model",
        metavar="CKPT",
        help="SDXL base: single-file .safetensors or a diffusers folder (default: the tiny twin)",
    )
    add_recipe_options(p)
    p.add_argument("--resume", action="store_true", help="continue from the last training state in OUTDIR")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--cache-dir", type=Path, help="latent cache (default: ~/.cache/loradrop/latents)")
    p.set_defaults(func=run)


def run(args) -> int:
    from loradrop.errors import UserError
    from loradrop.progress import ProgressLine, describe_progress

    recipe = resolve_recipe(args)
    if not args.dataset.is_dir():
        raise UserError(f"{args.dataset} is not a folder; expected a folder of images with .txt captions.")
    if not _names_itself(args):
        recipe = recipe.updated({"output_name": _folder_name(args.dataset)}, source=str(args.dataset))

    from loradrop.engine.data.dataset import scan

    dataset = scan(args.dataset, recipe)  # before the model loads: a bad folder fails at once

    import torch

    from loradrop.engine.data.latents import default_cache_dir
    from loradrop.engine.events import Artifact, Log, Progress, Sample
    from loradrop.engine.models.hashes import model_hashes
    from loradrop.engine.models.sdxl import load_sdxl
    from loradrop.engine.models.tiny import default_model_path
    from loradrop.engine.train.distributed import init_from_env, pick_device
    from loradrop.engine.train.loop import train
    from loradrop.engine.train.precision import Precision

    world = init_from_env()
    device = pick_device(args.device, world)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but this machine has no usable CUDA GPU.")
    precision = Precision.for_run_settings(recipe.mixed_precision, device)
    model_path = args.model or str(default_model_path())
    bar = ProgressLine() if world.is_main else None

    def emit(event) -> None:
        if bar is None:
            return
        if isinstance(event, Progress):
            figures = describe_progress(
                loss=event.loss,
                avg_loss=event.avg_loss,
                lr_unet=event.lr_unet,
                rate=event.rate,
                eta_s=event.eta_s,
            )
            bar.update("step" if event.stage == "train" else event.stage, event.done, event.total, figures)
        elif isinstance(event, Log):
            bar.message(("warning: " if event.level == "warning" else "") + event.text)
        elif isinstance(event, Sample):
            bar.message(f"sample  {event.path}")
        elif isinstance(event, Artifact) and event.kind == "final":
            bar.message(f"saved   {event.path}")

    for line in dataset.scan_report():  # per N_name/ subfolder: images, repeats, skipped (as in a job's log)
        emit(Log(line))
    for warning in (dataset.subfolder_warning(), dataset.orphan_warning()):
        if warning:
            emit(Log(warning, "warning"))
    if bar:
        bar.message(f"loading {model_path}")
    model = load_sdxl(
        model_path,
        dtype=precision.weights,
        vae_dtype=torch.float32 if recipe.no_half_vae else precision.weights,
    )
    for part in ("unet", "te1", "te2", "vae"):
        model.component(part).to(device)
    cache_dir = args.cache_dir or default_cache_dir()
    result = train(
        model,
        dataset,
        args.out,
        recipe,
        device=device,
        cache_dir=cache_dir,
        emit=emit,
        resume=args.resume,
        world=world,
        model_hashes=model_hashes(model_path) if Path(model_path).is_file() else None,
    )
    if bar:
        bar.close()
        print(result.final, file=sys.stdout)
    return 0


def _names_itself(args) -> bool:
    """Whether --recipe or --set gives output_name."""
    from loradrop.engine.recipe import load_toml

    if any(item.partition("=")[0].strip() == "output_name" for item in args.overrides):
        return True
    return bool(args.recipe) and "output_name" in load_toml(args.recipe)


def _folder_name(folder: Path) -> str:
    """A run's default name: its dataset folder's, so every LoRA gets its own ss_output_name (A1111
    treats LoRAs of one name as one alias), made a plain file name."""
    name = folder.resolve().name.replace("\\", "-").lstrip(".")
    return name or "lora"
