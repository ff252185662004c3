"""`loradrop tui`: the terminal client; attaches to a daemon (here, or over an ssh-forwarded socket)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from loradrop.proto.connect import add_arguments
    from loradrop.tui import IMAGE_PROTOCOLS

    p = sub.add_parser(
        "tui",
        help="the terminal client: queue, live logs, samples as pixels, block weights",
        description=(
            "Attach to the loradrop daemon and show its queue, a job's live log, loss and samples (as real pixels where "
            "the terminal can: sixel or the kitty graphics protocol), its files, and a LoRA's block vector to edit, "
            "preview and chop. Over ssh: `ssh -t gpu-box loradrop tui`. It survives a daemon restart."
        ),
    )
    add_arguments(p)
    p.add_argument(
        "--image-protocol",
        choices=IMAGE_PROTOCOLS,
        default="auto",
        help="how to draw pictures: auto (ask the terminal; with only 16 colours, none), sixel, tgp (kitty), halfcell (coloured half blocks) or none (default: auto)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from rich.console import Console

    from loradrop.proto.connect import target_from_args
    from loradrop.tui.images import choose_pictures

    # Textual draws in the colours Rich finds here (TEXTUAL_COLOR_SYSTEM overrides them, as in Textual).
    colours = Console(
        color_system=os.environ.get("TEXTUAL_COLOR_SYSTEM", "auto"), force_terminal=True
    ).color_system
    pictures = choose_pictures(
        args.image_protocol, colours, os.environ.get("TERM", "")
    )  # asks the terminal now, before Textual owns it

    from loradrop.tui.app import LoradropApp
    from loradrop.tui.link import Target

    LoradropApp(Target(target_from_args(args), args.token_file, args.tls_ca), pictures).run()
    return 0
