"""Read a kohya `sdxl_train_network.py` command line into a Recipe.

The recipe means what the command meant: a flag the command leaves out takes kohya's default (no
--flip_aug is no flipping, no --max_bucket_reso is 1024), not the seed's. Run paths (model, dataset,
output folders) are reported, not stored, because a recipe is the same for any dataset. Every flag
loradrop cannot honour is named; none is dropped silently. Imports no torch.
"""

from __future__ import annotations

import ast
import dataclasses
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from loradrop.errors import UserError

from .recipe import Recipe, did_you_mean

SCRIPT = "sdxl_train_network.py"

# Where things are, not how to train: `loradrop train` takes these on its own command line.
RUN_PATHS = {
    "pretrained_model_name_or_path": "pass it with --model",
    "train_data_dir": "pass it as DATASET (its N_name/ subfolders train N times each, as in kohya)",
    "output_dir": "pass it with -o",
    "logging_dir": "pass it with -o (TensorBoard logs go under the output folder)",
}

# store_true flags: absent means off.
SWITCHES = (
    "enable_bucket",
    "shuffle_caption",
    "flip_aug",
    "cache_latents",
    "cache_latents_to_disk",
    "gradient_checkpointing",
    "sdpa",
    "no_half_vae",
)
# store_true flags loradrop also reads off the checkpoint: given means true; absent keeps "auto"
# (kohya would train epsilon, which is wrong for a v-prediction checkpoint).
DETECTED_SWITCHES = ("v_parameterization", "zero_terminal_snr")

# Flags that take one value and are named exactly as their recipe key.
DIRECT = (
    "output_name",
    "seed",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "caption_extension",
    "keep_tokens",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "dataset_repeats",
    "max_data_loader_n_workers",
    "network_module",
    "network_dim",
    "network_alpha",
    "network_dropout",
    "learning_rate",
    "unet_lr",
    "optimizer_type",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_grad_norm",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_train_steps",
    "mixed_precision",
    "multires_noise_iterations",
    "multires_noise_discount",
    "save_every_n_steps",
    "save_precision",
    "save_model_as",
    "sample_sampler",
    "sample_every_n_steps",
    "log_with",
    "log_prefix",
)
SPECIAL = (
    "resolution",
    "sample_prompts",
    "text_encoder_lr",
    "network_args",
    "optimizer_args",
    "lr_scheduler_args",
)

# --network_args keys LyCORIS reads -> recipe keys (use_cp and use_conv_cp are its old names for use_tucker).
NETWORK_ARGS = {
    "conv_dim": "conv_dim",
    "conv_alpha": "conv_alpha",
    "algo": "algo",
    "preset": "preset",
    "dropout": "network_dropout",
    "rank_dropout": "rank_dropout",
    "module_dropout": "module_dropout",
    "use_tucker": "use_tucker",
    "use_cp": "use_tucker",
    "use_conv_cp": "use_tucker",
    "use_scalar": "use_scalar",
    "dora_wd": "dora_wd",
    "train_norm": "train_norm",
    "wd_on_output": "wd_on_output",
    "factor": "factor",
    "decompose_both": "decompose_both",
    "full_matrix": "full_matrix",
}
# --network_args that loradrop has no setting for, harmless at LyCORIS' default (what loradrop does).
NETWORK_ARGS_AT_DEFAULT = {
    "rank_dropout_scale": False,
    "bypass_mode": False,
    "rs_lora": False,
    "rescaled": False,
}

# What kohya does when a flag is absent (sd-scripts' argument defaults; network ones are LyCORIS').
# Not here: keys derived from other flags (see _derive) and keys kohya leaves unset (seed, ...).
KOHYA_DEFAULTS: dict[str, Any] = {
    **{key: False for key in SWITCHES},
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "caption_extension": ".caption",
    "keep_tokens": 0,
    "caption_dropout_rate": 0.0,
    "caption_tag_dropout_rate": 0.0,
    "dataset_repeats": 1,
    "max_data_loader_n_workers": 8,
    "network_dim": 4,
    "network_alpha": 1.0,
    "network_dropout": 0.0,
    "algo": "locon",
    "preset": "full",
    "rank_dropout": 0.0,
    "module_dropout": 0.0,
    "use_tucker": False,
    "use_scalar": False,
    "dora_wd": False,
    "train_norm": False,
    "factor": -1,
    "decompose_both": False,
    "full_matrix": False,
    "learning_rate": 2e-6,
    "optimizer_type": "AdamW",
    "optimizer_args": {},
    "lr_scheduler": "constant",
    "lr_scheduler_args": {},
    "lr_warmup_steps": 0,
    "max_grad_norm": 1.0,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "max_train_steps": 1600,
    "mixed_precision": "no",
    "multires_noise_iterations": 0,
    "multires_noise_discount": 0.3,
    "save_every_n_steps": 0,
    "save_precision": "float",
    "save_model_as": "safetensors",
    "sample_every_n_steps": 0,
    "sample_sampler": "ddim",
    "log_prefix": "",
}

# Why some common kohya flags have no recipe key, and what to do instead.
NO_KEY_BECAUSE = {
    "max_train_epochs": "loradrop counts optimizer steps: set max_train_steps",
    "save_every_n_epochs": "set save_every_n_steps",
    "sample_every_n_epochs": "set sample_every_n_steps",
    "xformers": "loradrop uses sdpa",
    "mem_eff_attn": "loradrop uses sdpa",
    "network_weights": "loradrop starts every run from a fresh network",
    "resume": "use `loradrop train --resume`",
    "dataset_config": "loradrop reads the DATASET folder itself",
    "vae": "loradrop uses the checkpoint's own VAE",
    "reg_data_dir": "loradrop does not train with regularization images (kohya's prior loss); leave it out",
    "prior_loss_weight": "loradrop does not train with regularization images (kohya's prior loss); leave it out",
    "caption_dropout_every_n_epochs": "loradrop counts steps, not epochs: use caption_dropout_rate",
    "keep_tokens_separator": "loradrop keeps the first keep_tokens tags: set keep_tokens",
}

_FIELD_TYPES = typing.get_type_hints(Recipe)
_KNOWN = (*RUN_PATHS, *SWITCHES, *DETECTED_SWITCHES, *DIRECT, *SPECIAL)


@dataclass
class KohyaConversion:
    recipe: Recipe
    paths: list[str] = field(default_factory=list)  # "--flag=value: what to do with it"
    unsupported: list[str] = field(
        default_factory=list
    )  # "--flag=value: why"; values the recipe refuses last
    notes: list[str] = field(default_factory=list)


def read_kohya(path: str | Path) -> KohyaConversion:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"{path} does not exist; expected a file holding a kohya {SCRIPT} command line."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} cannot be read as text ({e}); expected a kohya {SCRIPT} command line."
        ) from None
    return convert_kohya(text, source=str(path))


def convert_kohya(text: str, *, source: str = "command line") -> KohyaConversion:
    out = KohyaConversion(Recipe())
    flags = _group(_script_arguments(text, source, out.notes), out.unsupported)
    values: dict[str, tuple[Any, str]] = {}  # recipe key -> (value, the flag it came from)
    for name, args in flags.items():
        shown = f"--{name}" + (f"={args[0]}" if len(args) == 1 else "".join(f" {a}" for a in args))
        if name in RUN_PATHS:
            out.paths.append(f"{shown}: {RUN_PATHS[name]}")
        elif name in SWITCHES or name in DETECTED_SWITCHES:
            if args:
                raise UserError(f"{source}: --{name} is a switch and takes no value, not {args[0]!r}.")
            values[name] = (True, shown)
        elif name in DIRECT:
            values[name] = (_typed(name, _one(name, args, source), shown, source), shown)
        elif name == "resolution":
            _resolution(_one(name, args, source), shown, source, values, out.unsupported)
        elif name == "sample_prompts":
            prompts = PurePosixPath(_one(name, args, source))
            values[name] = (prompts.name, shown)
            if str(prompts.parent) != ".":
                out.paths.append(
                    f"{shown}: the recipe keeps the name {prompts.name}; put that file in the DATASET folder"
                )
        elif name == "text_encoder_lr":
            # kohya takes one lr per text encoder; loradrop trains both in one group.
            rates = {_typed(name, a, shown, source) for a in args}
            if len(rates) == 1:
                values[name] = (rates.pop(), shown)
            elif rates:
                out.unsupported.append(f"{shown}: loradrop uses one text_encoder_lr for both text encoders")
        elif name == "network_args":
            _network_args(args, source, values, out.unsupported)
        elif name in ("optimizer_args", "lr_scheduler_args"):
            values[name] = (_literal_args(name, args, source), shown)
        else:
            why = NO_KEY_BECAUSE.get(name) or "loradrop has no such setting" + did_you_mean(name, _KNOWN)
            out.unsupported.append(f"{shown}: {why}")
    given = set(values)
    _derive(values, flags)
    out.recipe = _apply(values, out.unsupported)
    _note_unset(flags, given, out)
    return out


def _script_arguments(text: str, source: str, notes: list[str]) -> list[str]:
    """The arguments after the script name; the launcher before it (accelerate launch ...) is noted."""
    text = text.replace("\r\n", "\n").replace("\\\n", " ")  # join the shell's continuation lines
    commands, scripted, first_error = [], [], None
    for line in text.split("\n"):
        if line.lstrip().startswith("#"):
            continue
        try:
            tokens = shlex.split(line)
        except ValueError as e:
            first_error = first_error or e  # prose around a command (a guide's text) may not parse
            continue
        # shlex's own comment handling would also cut `name#1` short; the shell cuts only at a word start.
        tokens = tokens[: next((i for i, t in enumerate(tokens) if t.startswith("#")), len(tokens))]
        at = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        if at is not None:
            scripted.append((tokens, at))
        commands.append(tokens)
    ours = [(c, i) for c, i in scripted if PurePosixPath(c[i]).name == SCRIPT]
    if len(ours) == 1 or (not ours and len(scripted) == 1):
        tokens, at = (ours or scripted)[0]
        if PurePosixPath(tokens[at]).name != SCRIPT:
            notes.append(f"the command runs {tokens[at]}, not {SCRIPT}; its flags were read as {SCRIPT}'s")
        launcher_options = [t for t in tokens[:at] if t.startswith("-")]
        if launcher_options:
            notes.append(
                f"ignored the launcher's options before the script (not part of a recipe): {' '.join(launcher_options)}"
            )
        return tokens[at + 1 :]
    if len(ours) > 1 or len(scripted) > 1:
        what = SCRIPT if ours else "python script"
        raise UserError(
            f"{source} holds {len(ours) or len(scripted)} {what} commands; keep only the one to convert."
        )
    if first_error is not None:
        raise UserError(f"{source}: cannot split the command line ({first_error}); check its quotes.")
    arguments = [t for c in commands for t in c]
    if not arguments or not arguments[0].startswith("--"):
        raise UserError(f"{source} holds no {SCRIPT} command line (nor a list of --flags) to convert.")
    return arguments


def _group(tokens: list[str], unsupported: list[str]) -> dict[str, list[str]]:
    """--flag=value, --flag value, --flag v1 v2 ... -> {flag: [values]}; a repeated flag's last use wins, as in argparse."""
    flags: dict[str, list[str]] = {}
    current = None
    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            flags.pop(name, None)  # keep command order for the last use
            current = flags[name] = [value] if eq else []
        elif current is None:
            unsupported.append(f"{token}: a stray argument before any --flag")
        else:
            current.append(token)
    return flags


def _one(name: str, args: list[str], source: str) -> str:
    if len(args) != 1:
        got = "none" if not args else " ".join(args)
        raise UserError(f"{source}: --{name} takes one value, got {got}.")
    return args[0]


def _typed(key: str, text: str, shown: str, source: str) -> Any:
    kind = _FIELD_TYPES[key]
    if kind is bool:  # only network_args give bools a value
        return _lycoris_bool(text)
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise UserError(
                f"{source}: {shown} is not {'an integer' if kind is int else 'a number'}."
            ) from None
    return text


def _lycoris_bool(text: str) -> bool:
    """How LyCORIS reads a network_args flag: anything but "false" is on (so "0" is on)."""
    return text.strip().lower() != "false"


def _resolution(text: str, shown: str, source: str, values: dict, unsupported: list[str]) -> None:
    try:
        sides = [int(side) for side in text.split(",")]
    except ValueError:
        raise UserError(f"{source}: {shown} is not SIZE or WIDTH,HEIGHT.") from None
    if len(sides) > 2:
        raise UserError(f"{source}: {shown} is not SIZE or WIDTH,HEIGHT.")
    if len(set(sides)) == 1:
        values["resolution"] = (sides[0], shown)
    else:
        unsupported.append(
            f"{shown}: loradrop's bucket area is resolution², so only square resolutions convert"
        )


def _network_args(args: list[str], source: str, values: dict, unsupported: list[str]) -> None:
    for entry in args:
        key, eq, text = entry.partition("=")
        if not eq:
            raise UserError(f"{source}: --network_args entry {entry!r} is not key=value.")
        shown = f"--network_args {entry}"
        if key in NETWORK_ARGS:
            target = NETWORK_ARGS[key]
            value = _typed(target, text, shown, source)
            if target == "algo":
                value = {"lora": "locon"}.get(
                    value.lower(), value.lower()
                )  # LyCORIS' "lora" is its LoCon module
            values[target] = (value, shown)
        elif key in NETWORK_ARGS_AT_DEFAULT:
            if _lycoris_bool(text) != NETWORK_ARGS_AT_DEFAULT[key]:
                unsupported.append(f"{shown}: loradrop supports only {key}={NETWORK_ARGS_AT_DEFAULT[key]}")
        else:
            unsupported.append(f"{shown}: loradrop has no such setting")


def _literal_args(name: str, args: list[str], source: str) -> dict[str, Any]:
    """key=value entries read as kohya reads them (Python literals), tuples made TOML lists."""
    table = {}
    for entry in args:
        key, eq, text = entry.partition("=")
        if not eq:
            raise UserError(f"{source}: --{name} entry {entry!r} is not key=value.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        table[key] = list(value) if isinstance(value, tuple) else value
    return table


def _derive(values: dict[str, tuple[Any, str]], flags: dict[str, list[str]]) -> None:
    """Fill what the command leaves out the way kohya and LyCORIS would."""
    sampler_given = "sample_sampler" in values
    for key, value in KOHYA_DEFAULTS.items():
        values.setdefault(key, (value, f"kohya's default {key}={value!r}"))
    lr = values["learning_rate"][0]
    for key in ("unet_lr", "text_encoder_lr"):
        values.setdefault(key, (lr, f"kohya's default {key} (the learning_rate)"))
    values.setdefault("conv_dim", (values["network_dim"][0], "LyCORIS' default conv_dim (the network_dim)"))
    values.setdefault(
        "conv_alpha", (values["network_alpha"][0], "LyCORIS' default conv_alpha (the network_alpha)")
    )
    if values["dora_wd"][0]:  # the recipe's own default is the axis A1111 and ComfyUI load right
        values.setdefault("wd_on_output", (True, "LyCORIS' default wd_on_output=True"))
    values.setdefault(
        "log_with", ("tensorboard" if "logging_dir" in flags else "none", "kohya's default log_with")
    )
    scheduler_args, origin = values["lr_scheduler_args"]
    if values["lr_scheduler"][0] == "cosine" and "num_cycles" not in scheduler_args:
        values["lr_scheduler_args"] = ({**scheduler_args, "num_cycles": 0.5}, origin)  # transformers' default
    if values["sample_every_n_steps"][0] == 0 and not sampler_given:
        del values["sample_sampler"]  # kohya's default sampler matters only when it samples


def _apply(values: dict[str, tuple[Any, str]], unsupported: list[str]) -> Recipe:
    try:
        return Recipe().updated({key: value for key, (value, _) in values.items()})
    except UserError:
        pass
    # One value at a time, so each one loradrop refuses is named and the rest still convert.
    recipe = Recipe()
    for key, (value, origin) in values.items():
        try:
            recipe = recipe.updated({key: value}, source=origin)
        except UserError as e:
            unsupported.append(str(e).rstrip("."))
    return recipe


def _note_unset(flags: dict[str, list[str]], given: set[str], out: KohyaConversion) -> None:
    seed = Recipe()
    if "seed" not in flags:
        out.notes.append(
            f"the command sets no --seed (kohya then picks one at random); the recipe keeps seed = {seed.seed}"
        )
    for name in ("resolution", "network_module"):
        if name not in flags:
            out.notes.append(
                f"the command sets no --{name}; the recipe keeps {name} = {getattr(seed, name)!r}"
            )
    for name in DETECTED_SWITCHES:
        if name not in flags:
            out.notes.append(
                f"the command sets no --{name}; the recipe keeps {name} = 'auto', read off the checkpoint"
            )
    defaulted = [
        f"{f.name}={getattr(out.recipe, f.name)!r}"
        for f in dataclasses.fields(Recipe)
        if f.name not in given and getattr(out.recipe, f.name) != getattr(seed, f.name)
    ]
    if defaulted:
        out.notes.append(f"the command leaves these out, so kohya's defaults apply: {', '.join(defaulted)}")
