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
        help="how to draw pictures: auto (ask the terminal), sixel, tgp (kitty), halfcell (coloured half blocks, any terminal) or none (default: auto)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from loradrop.tui.images import image_widget_class

    image_class = image_widget_class(args.image_protocol)  # asks the terminal now, before Textual owns it

    from loradrop.tui.app import LoradropApp
    from loradrop.tui.link import Target

    LoradropApp(Target(args.connect, args.token_file, args.tls_ca), image_class).run()
    return 0
