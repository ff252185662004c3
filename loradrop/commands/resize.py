"""`loradrop resize`: shrink a LoRA against its base checkpoint, as resize_lora does."""

from __future__ import annotations

import sys
import time

_RECIPE_HELP = """\
The recipe is comma-separated key[=value], as in resize_lora:
  score weights  spn_lora  spn_ckpt  subspace  fro_lora  fro_ckpt  params
                 (a bare name means weight 1; weights are normalised to sum 1)
  thr=T          keep the dimensions whose score is above T (log10 units)
  size=MiB       instead, choose T so the kept dimensions fit this size
  rescale=R      multiply the result by R (default 1)
Each singular value s of a module's ΔW scores
  log10 s + log10 R - sum(weight_k * log10 Ref_k)
with Ref: spn_ckpt = largest singular value of the base weight, fro_ckpt = its
Frobenius norm, spn_lora = the module's largest s, fro_lora = the module's
Frobenius norm, subspace = |u' W v| along that dimension, params = in + out size.
So fro_ckpt=1,thr=-3.55 (the default, the guide's) keeps s >= 10^-3.55 * ||W||.

The result is written as <lora stem>_<recipe>_th<T>.safetensors (e.g.
mylora_frockpt1_th-3.55.safetensors) beside the LoRA or in -o, with the input's
metadata plus resize_params, ss_network_dim/ss_network_alpha that describe the
result, its own name (ss_output_name: the input's + the same suffix) and fresh
sshs hashes. Every module gets the input's most common alpha, its own scale
folded into lora_up, so diffusers gives each module its strength. Modules the
base lacks are kept (the same effect) and listed; all-zero modules are dropped."""


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser(
        "resize",
        help="shrink a LoRA against its base checkpoint (resize_lora's recipes)",
        description="Shrink a LoRA/LoCon: drop the dimensions of each module's ΔW that are small next to\n"
        "the base model's weights, with one threshold over the whole file.",
        epilog=_RECIPE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", metavar="BASE", help="the SDXL checkpoint the LoRA was trained on (.safetensors)")
    p.add_argument("lora", metavar="LORA", help="the LoRA/LoCon file to shrink")
    p.add_argument(
        "-r", "--recipe", help="score recipe (default: the guide's fro_ckpt=1,thr=-3.55; see below)"
    )
    p.add_argument(
        "-o", "--out-dir", metavar="OUTDIR", help="folder for the result (default: beside the LoRA)"
    )
    p.add_argument(
        "--dtype",
        choices=("fp16", "fp32"),
        default="fp16",
        help="dtype of the written tensors (default fp16)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where to compute (default: cuda if available, else cpu)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from loradrop.engine.lora.resize import DEFAULT_RECIPE, resize

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    recipe = args.recipe or DEFAULT_RECIPE
    report = resize(
        args.base, args.lora, recipe, args.out_dir, args.dtype, device, progress=_Bar("resize").update
    )
    for line in report.lines():
        print(line)
    return 0


class _Bar:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str):
        self.label = label
        self.start = time.monotonic()
        self.shown = 0.0

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.shown < 0.1:
            return
        self.shown = now
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} modules {now - self.start:5.1f}s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
