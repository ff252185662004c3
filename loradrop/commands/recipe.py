"""`loradrop recipe`: show the resolved training recipe, or make one from a kohya command line.

Both actions are torch-free: they only read and write TOML.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "recipe",
        help="show the training recipe, or convert a kohya command line into one",
        description=(
            "A recipe is every training setting, named as kohya's sdxl_train_network.py flags and "
            "defaulting to the seed's 80-step LoCon. It lives in a TOML file; `loradrop train "
            "--recipe FILE.toml --set key=value` uses one."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    show = actions.add_parser(
        "show",
        help="print the resolved recipe as TOML",
        description=(
            "Print the recipe that results from the seed's defaults, then --recipe, then each "
            "--set, as TOML that `--recipe` reads back."
        ),
    )
    add_recipe_options(show)
    show.add_argument(
        "--diff", action="store_true", help="print only the settings that differ from the seed's defaults"
    )

    convert = actions.add_parser(
        "from-kohya",
        help="turn a kohya sdxl_train_network.py command line into a recipe",
        description=(
            "Read FILE, which holds a kohya `sdxl_train_network.py` command line (as typed in a shell, "
            "with backslash continuations and quotes; other lines, such as a guide's prose, are "
            "skipped), and write the recipe it means. Flags the command leaves out take kohya's "
            "defaults. Run paths (model, dataset, output and log folders) are reported, not stored: "
            "pass them to `loradrop train`. Every flag loradrop does not support is named on stderr."
        ),
    )
    convert.add_argument("file", metavar="FILE", help="the file with the command line ('-' reads stdin)")
    convert.add_argument("-o", "--output", metavar="OUT.toml", help="write the recipe here (default: stdout)")
    p.set_defaults(func=run)


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    """--recipe and --set, for every command that resolves a recipe (see resolve_recipe)."""
    p.add_argument(
        "--recipe", metavar="FILE.toml", help="start from this recipe file instead of the seed's defaults"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='override one setting (repeatable); VALUE is read as TOML: 40, 3e-4, true, "text", {num_cycles=0.5}',
    )


def resolve_recipe(args):
    """The seed's defaults, then --recipe, then each --set."""
    from loradrop.engine.recipe import Recipe

    recipe = Recipe.from_toml(args.recipe) if args.recipe else Recipe()
    return recipe.with_overrides(args.overrides)


def run(args) -> int:
    return {"show": _show, "from-kohya": _from_kohya}[args.action](args)


def _show(args) -> int:
    import tomli_w

    recipe = resolve_recipe(args)
    layers = ["the seed's defaults"]
    if args.recipe:
        layers.append(args.recipe)
    layers += [f"--set {item}" for item in args.overrides]
    header = [f"# loradrop recipe: {', then '.join(layers)}"]
    if args.diff:
        changed = recipe.diff()
        header.append(
            "# only the settings that differ from the seed's defaults"
            if changed
            else "# the same as the seed's defaults"
        )
        body = tomli_w.dumps(changed)
    else:
        body = recipe.to_toml()
    sys.stdout.write("\n".join(header) + "\n" + body)
    return 0


def _from_kohya(args) -> int:
    from loradrop.engine.kohya_args import convert_kohya, read_kohya
    from loradrop.fsutil import atomic_write_text

    source = "stdin" if args.file == "-" else args.file
    result = convert_kohya(sys.stdin.read(), source=source) if args.file == "-" else read_kohya(args.file)

    header = [f"# loradrop recipe, converted from the kohya command line in {source}"]
    header += [f"# note: {note}" for note in result.notes]
    if result.paths:
        header.append("# not part of a recipe (give these to `loradrop train`):")
        header += [f"#   {line}" for line in result.paths]
    if result.unsupported:
        header.append("# not converted (loradrop does not support them; the seed's values stand):")
        header += [f"#   {line}" for line in result.unsupported]
    text = "\n".join(header) + "\n\n" + result.recipe.to_toml()
    if args.output:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)

    for note in result.notes:
        _tell(f"note: {note}")
    if result.paths:
        _tell("not part of a recipe:", result.paths)
    if result.unsupported:
        _tell(
            f"warning: {len(result.unsupported)} flag(s) not supported, left out of the recipe (the seed's values stand):",
            result.unsupported,
        )
    if args.output:
        _tell(f"wrote {args.output}")
    return 0


def _tell(line: str, items: list[str] = ()) -> None:
    print(f"loradrop: {line}", *(f"  {item}" for item in items), sep="\n", file=sys.stderr)
