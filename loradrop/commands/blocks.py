"""`loradrop blocks`: a LoRA's UNet block layout (as chop_blocks prints it) and where its ΔW sits."""

from __future__ import annotations

import argparse

from loradrop.errors import UserError

DEFAULT_SHARE = 0.9


def add_parser(sub) -> None:
    p = sub.add_parser(
        "blocks",
        help="show a LoRA's UNet blocks, their energy, and a vector for chop",
        description=(
            "Print the LoRA's UNet blocks as chop_blocks does (index, block, tensor count), the vector "
            "string chop expects, and the pass-through count (text encoders and keys outside the blocks). "
            "Each block also shows its energy, the sum of ||ΔW||_F over its modules; with --model, also "
            "relative to the base weights (sum of ||ΔW||_F / ||W||_F), which then sets the shares."
        ),
        epilog=(
            "Vectors: entry 0 comes first, then one weight per block in the order shown. For `loradrop chop` "
            "entry 0 is a global factor on every UNet block and the text encoders always pass through; in "
            "ComfyUI's Lora Loader (Block Weight) entry 0 is BASE, the text encoders' strength. A vector "
            "starting with 1 means the same in both."
        ),
    )
    p.add_argument("lora", metavar="LORA", help="the LoRA/LoCon file")
    p.add_argument(
        "--model",
        metavar="BASE",
        help="the SDXL checkpoint it was trained on: adds energy relative to its weights "
        "(with --effect: the model to measure on; default: the embedded twin)",
    )
    p.add_argument(
        "--suggest",
        nargs="?",
        const=DEFAULT_SHARE,
        type=_share,
        metavar="SHARE",
        help=f"propose the smallest chop vector keeping this share of the block energy (default {DEFAULT_SHARE}; 0.9 or 90%%)",
    )
    p.add_argument(
        "--effect",
        action="store_true",
        help="suggest by measured effect, not energy: switch each block off in turn and measure how far samples of the "
        "prompts move (what looking at per-block samples does by hand; the energy of a block follows its width, not its effect)",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="with --effect: a sample-prompt file (default: the prompts the LoRA's job sampled, beside it)",
    )
    p.set_defaults(func=run)


def _share(text: str) -> float:
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a share; give 0.9 or 90%") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"the share must be above 0 and at most 1 (100%); got {text}")
    return value


def run(args) -> int:
    from loradrop.engine.lora.blocks import ENTRY0_CHOP, ENTRY0_LOADER, energy, format_weight, suggest

    report = energy(args.lora, args.model)
    for line in report.lines():
        print(line)
    if args.effect and args.suggest is None:
        raise UserError("--effect changes how --suggest chooses blocks; add --suggest.")
    if args.suggest is not None:
        if not report.blocks:
            raise UserError(f"{args.lora} has no UNet blocks, so there is nothing to suggest.")
        if args.effect:
            return _suggest_by_effect(args)
        vector = suggest(report.shares, args.suggest)
        kept = [b for b, v in zip(report.blocks, vector[1:]) if v]
        got = sum(b.share for b in kept)
        what = "relative energy" if report.relative else "energy"
        print(
            f"Suggested vector ({len(kept)} of {len(report.blocks)} blocks, {100 * got:.1f}% of the block {what}; "
            f"asked {100 * args.suggest:g}%): {','.join(map(format_weight, vector))}"
        )
        print(f"Entry 0 = 1 means the same in both tools: {ENTRY0_CHOP}; {ENTRY0_LOADER}.")
    return 0


def _suggest_by_effect(args) -> int:
    from pathlib import Path

    from loradrop.engine.data.prompts import parse_prompt_file
    from loradrop.engine.lora.blocks import ENTRY0_CHOP, ENTRY0_LOADER, format_weight
    from loradrop.engine.lora.effect import suggest_by_effect
    from loradrop.engine.models.sdxl import load_sdxl
    from loradrop.engine.models.tiny import default_model_path
    from loradrop.engine.outputs import prompts_beside

    source = Path(args.prompts) if args.prompts else prompts_beside(args.lora)
    if not source.is_file():
        raise UserError(
            f"{source} does not exist; give the prompts to measure with: --prompts FILE (kohya's sample-prompt lines)."
        )
    prompts = parse_prompt_file(source)
    if not prompts:
        raise UserError(f"{source} holds no prompts; give a file with at least one sample-prompt line.")
    model = load_sdxl(args.model or default_model_path())
    vector, report = suggest_by_effect(
        model,
        args.lora,
        prompts,
        args.suggest,
        progress=lambda done, total: print(f"measuring: {done}/{total}", end="\r", flush=True),
    )
    print()
    for line in report.lines():
        print(line)
    kept = [s for s, v in zip(report.shares, vector[1:]) if v]
    print(
        f"Suggested vector ({len(kept)} of {len(report.effects)} blocks, {100 * sum(kept):.1f}% of the measured effect; "
        f"asked {100 * args.suggest:g}%): {','.join(map(format_weight, vector))}"
    )
    print(f"Entry 0 = 1 means the same in both tools: {ENTRY0_CHOP}; {ENTRY0_LOADER}.")
    return 0
