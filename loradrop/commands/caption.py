"""`loradrop caption`: write same-stem .txt captions for a folder of images with a local tagger or
vision-language model (engine/caption; docs/captions.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_TAGGER_FLAGS = ("threshold", "character_threshold", "exclude_tags", "keep_rating", "rgb")
_VLM_FLAGS = ("prompt", "max_length")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "caption",
        help="caption a folder of images with a local WD14 tagger or vision-language model",
        description=(
            "Write a same-stem .txt caption beside every image in DIR, with a model from a local path "
            "(nothing is downloaded): a WD14-family tagger (a folder with model.onnx and "
            "selected_tags.csv, run with onnxruntime) or a transformers vision-language model "
            "(a save_pretrained folder: LLaVA, Qwen-VL, BLIP, Florence-2, ...)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  loradrop caption ./mychar --model ~/models/wd-vit-tagger-v3 --trigger mychar --dry-run\n"
            "  loradrop caption ./mychar --model ~/models/wd-vit-tagger-v3 --exclude-tags 'simple background, white background'\n"
            "  loradrop caption ./mychar --model ~/models/llava-1.5-7b-hf --prompt 'Describe the image in one sentence.' --missing-only"
        ),
    )
    p.add_argument("dir", metavar="DIR", type=Path, help="folder of images")
    p.add_argument(
        "--model",
        metavar="PATH",
        type=Path,
        required=True,
        help="the tagger's folder (or its model.onnx), or a transformers model folder",
    )
    p.add_argument(
        "--kind",
        choices=("tagger", "vlm"),
        help="what --model holds (default: model.onnx means tagger, config.json vlm)",
    )
    p.add_argument("--trigger", metavar="WORD", help="put WORD first in every caption")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing captions")
    existing.add_argument(
        "--missing-only",
        action="store_true",
        help="caption only the images without one (default: refuse if any has one)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the captions that would be written; write nothing"
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per model call (default 4)")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), help="where the model runs (default: the GPU when there is one)"
    )
    tagger = p.add_argument_group("tagger options")
    tagger.add_argument(
        "--threshold", type=float, help="keep general tags at least this likely (default 0.35)"
    )
    tagger.add_argument(
        "--character-threshold", type=float, help="the same for character tags (default: --threshold)"
    )
    tagger.add_argument(
        "--exclude-tags",
        metavar="TAGS",
        help="comma-separated tags never to write (with or without underscores)",
    )
    tagger.add_argument(
        "--keep-rating",
        action="store_true",
        help="write the most likely rating tag first (left out by default)",
    )
    tagger.add_argument("--rgb", action="store_true", help="the tagger takes RGB (the WD14 models take BGR)")
    vlm = p.add_argument_group("vision-language model options")
    vlm.add_argument(
        "--prompt", help="the instruction (chat models) or caption prefix/task token (BLIP, Florence-2)"
    )
    vlm.add_argument("--max-length", type=int, help="at most this many new tokens per caption (default 77)")
    p.set_defaults(func=run)


def run(args) -> int:
    from loradrop.engine.caption import Existing, Outcome, TaggerSpec, VlmSpec, caption_folder, detect_kind
    from loradrop.progress import ProgressLine

    spec = _spec(
        args, {"tagger": TaggerSpec, "vlm": VlmSpec}[args.kind] if args.kind else detect_kind(args.model)
    )
    if not isinstance(spec, TaggerSpec) and not args.verbose:
        _quiet_transformers()
    existing = (
        Existing.OVERWRITE if args.overwrite else Existing.KEEP if args.missing_only else Existing.REFUSE
    )
    bar = ProgressLine()
    try:
        result = caption_folder(
            args.dir,
            spec,
            trigger=args.trigger,
            existing=existing,
            dry_run=args.dry_run,
            progress=lambda done, total: bar.update("caption", done, total),
        )
    finally:
        bar.close()
    for r in result.images:
        if r.outcome is Outcome.WOULD_WRITE:
            print(f"{r.caption_file}: {r.caption}")
        elif r.outcome is Outcome.FAILED:
            print(f"failed: {r.reason}", file=sys.stderr)
    print(result.summary())
    return 1 if result.failed else 0


def _spec(args, kind):
    from loradrop.engine.caption import TaggerSpec, VlmSpec
    from loradrop.errors import UserError

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} is not a number of images; give 1 or more.")
    other = _VLM_FLAGS if kind is TaggerSpec else _TAGGER_FLAGS
    given = [f"--{name.replace('_', '-')}" for name in other if getattr(args, name) not in (None, False)]
    if given:
        what = "a tagger" if kind is TaggerSpec else "a vision-language model"
        raise UserError(
            f"{', '.join(given)} do not apply to {args.model}, which is {what}; leave them out (or pass --kind)."
        )
    common = {"model": args.model, "batch_size": args.batch_size, "device": args.device}
    if kind is VlmSpec:
        return VlmSpec(
            prompt=args.prompt, **({"max_length": args.max_length} if args.max_length else {}), **common
        )
    thresholds = [t for t in (args.threshold, args.character_threshold) if t is not None]
    if any(not 0 <= t <= 1 for t in thresholds):
        raise UserError(
            f"--threshold and --character-threshold are probabilities; give values from 0 to 1, not {thresholds}."
        )
    exclude = tuple(t.strip() for t in (args.exclude_tags or "").split(",") if t.strip())
    return TaggerSpec(
        **({"threshold": args.threshold} if args.threshold is not None else {}),
        character_threshold=args.character_threshold,
        exclude_tags=exclude,
        keep_rating=args.keep_rating,
        bgr=not args.rgb,
        **common,
    )


def _quiet_transformers() -> None:
    """transformers' loading bars and notes would tangle with ours; -v keeps them."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
