"""`loradrop make-tiny`: write the tiny SDXL twin as a single-file checkpoint."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "make-tiny",
        help="write the tiny SDXL twin (real topology, tiny widths) as a checkpoint",
        description=(
            "Write the tiny twin: an SDXL with SDXL's exact topology at tiny widths and fixed "
            "random weights, as a single-file SGM checkpoint that loads like a real one. It is "
            "the default model whenever no --model is given."
        ),
    )
    p.add_argument("out", metavar="OUT.safetensors", help="where to write the checkpoint")
    p.add_argument("--seed", type=int, default=None, help="weight seed (default: the embedded twin's)")
    p.set_defaults(func=run)


def run(args) -> int:
    from loradrop.engine.models.tiny import TINY_SEED, make_tiny

    path = make_tiny(args.out, seed=TINY_SEED if args.seed is None else args.seed)
    print(path)
    return 0
