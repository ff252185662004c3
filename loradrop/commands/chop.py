"""`loradrop chop`: keep, drop or weight a LoRA's UNet blocks, as chop_blocks does."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chop",
        help="keep, drop or weight a LoRA's UNet blocks (chop_blocks)",
        description=(
            "Write a copy of the LoRA with some UNet blocks removed or weighted. VECTOR has entry 0 and "
            "then one weight per block, in the order `loradrop blocks LORA` shows (e.g. the guide's "
            "1,0,0,0,0,0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,0 keeps only output_blocks.1 of a 20-block LoCon)."
        ),
        epilog=(
            "Entry 0: chop reads it as a global factor g on every UNet block (block b gets g * v_b) and always "
            "keeps the text encoders and other non-block keys as they are. ComfyUI's Lora Loader (Block Weight) "
            "reads the same entry as BASE, the text encoders' strength; with 1 the two agree. "
            "A weight of 0 removes the block's tensors, 1 copies them untouched (0/1 vectors give exactly "
            "chop_blocks' file). Other weights scale the block's ΔW linearly (only lora_up is scaled; chop_blocks "
            "scales alpha, down and up, i.e. ΔW by w^3). VECTOR may also be a preset (SDXL-LyC-ALL, -NONE, "
            "-INALL, -MIDALL, -OUTALL, or the 12-entry SDXL-* ones) or NAME:vector, as in the loader. The output "
            "is LORA's stem + -chop.safetensors beside it unless -o is given, with the input's metadata plus "
            "block_vector_string, named (ss_output_name) as the input + -chop, or as the -o file. Every module is "
            "written with one alpha, its own alpha/rank folded into lora_up (the same effect), so diffusers gives "
            "each module its strength."
        ),
    )
    p.add_argument("lora", metavar="LORA", help="the LoRA/LoCon file (the guide chops the resized one)")
    p.add_argument("vector", metavar="VECTOR", help="entry 0, then one weight per block (see below)")
    p.add_argument(
        "-o", "--out", metavar="OUT", help="output file (default: <stem>-chop.safetensors beside LORA)"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from loradrop.engine.lora.blocks import ENTRY0_CHOP, ENTRY0_LOADER, VectorLengthError, format_weight
    from loradrop.engine.lora.chop import chop

    try:
        result = chop(args.lora, args.vector, args.out)
    except VectorLengthError as e:
        for line in e.layout.lines():
            print(line, file=sys.stderr)
        raise
    for line in result.lines():
        print(line)
    kept_unet = sum(len(b.keys) for b in result.layout.blocks) - result.removed
    print(
        f"Keeping {kept_unet} keys from the UNet, {len(result.layout.passthrough)} passing through (text encoders)"
    )
    g = result.vector[0]
    if g != 1:
        print(
            f"Note: entry 0 is {format_weight(g)}: {ENTRY0_CHOP}, so every block was multiplied by it; "
            f"{ENTRY0_LOADER}, so the loader would show this vector differently."
        )
    print(f"wrote {result.path}")
    return 0
