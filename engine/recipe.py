"""The Recipe: every training setting, named as kohya's flags, defaulting to the seed's command.

One type, TOML in and out, `key=value` overrides. It imports no torch: the daemon's server
process resolves and freezes a job's recipe without loading the engine.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePath
from typing import Any, Literal, Mapping

import tomli_w

from loradrop.errors import UserError

# A kohya flag loradrop can also read off the checkpoint: "auto" reads it, true or false overrides.
Detected = Literal["auto", True, False]


@dataclass
class Recipe:
    # --- what the run is called
    output_name: str = "lora"
    seed: int = 42

    # --- data and buckets
    resolution: int = 1024  # kohya's "1024,1024": bucket area is resolution²
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 2048
    bucket_reso_steps: int = 32
    caption_extension: str = ".txt"
    shuffle_caption: bool = True
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0  # kohya's: a fetch trains on the empty caption this often
    caption_tag_dropout_rate: float = 0.0  # kohya's: each tag past keep_tokens is left out this often
    flip_aug: bool = True
    dataset_repeats: int = 1
    cache_latents: bool = True
    cache_latents_to_disk: bool = True
    max_data_loader_n_workers: int = 8  # threads decoding images for the latent cache

    # --- network: LyCORIS LoCon, preset full (algo loha or lokr, and dora_wd, for the other kinds)
    network_module: str = "lycoris.kohya"
    algo: str = "locon"
    preset: str = "full"
    network_dim: int = 8
    network_alpha: float = 4.0
    conv_dim: int = 256
    conv_alpha: float = 4.0
    network_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_tucker: bool = False  # loha and lokr only: hada_t1/t2, lokr_t2 on the 3×3 convs
    use_scalar: bool = False
    dora_wd: bool = False  # DoRA: LyCORIS' weight_decompose, on any algo
    # DoRA's norm per output row (LyCORIS' default, True) or per input column. A1111 and ComfyUI
    # load only the per-column one as LyCORIS trains it, so that is loradrop's default (README).
    wd_on_output: bool = False
    train_norm: bool = False
    # LoKr (algo lokr), LyCORIS' network_args: the Kronecker split's factor (-1: the most
    # balanced), also factoring the small half, or both halves stored whole.
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    # The seed adapted only the text encoders' MLPs (88 modules); True adds q/k/v/out.
    text_encoder_attention: bool = False

    # --- optimisation
    learning_rate: float = 3e-4
    unet_lr: float = 3e-4
    text_encoder_lr: float = 1e-4
    optimizer_type: str = "ClybW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: str = "cosine"
    lr_scheduler_args: dict[str, Any] = field(default_factory=lambda: {"num_cycles": 0.375})
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 6
    max_train_steps: int = 80
    gradient_checkpointing: bool = True
    sdpa: bool = True  # PyTorch's scaled-dot-product attention; false: diffusers' plain attention
    mixed_precision: str = "bf16"
    no_half_vae: bool = True
    multires_noise_iterations: int = 12
    multires_noise_discount: float = 0.4
    # What the base model predicts, kohya's flags: "auto" reads it off the checkpoint (ComfyUI's
    # v_pred and ztsnr keys, a diffusers folder's scheduler config); true or false overrides it.
    v_parameterization: Detected = "auto"
    zero_terminal_snr: Detected = "auto"  # the rescaled schedule that ends at pure noise; needs v

    # --- saving, sampling, logging
    save_every_n_steps: int = 1
    save_precision: str = "fp16"
    save_model_as: str = "safetensors"
    sample_prompts: str = "sample-prompts.txt"  # relative to the dataset folder
    sample_sampler: str = "euler_a"
    sample_every_n_steps: int = 10
    log_with: str = "tensorboard"
    log_prefix: str = "xl-locon"

    # --- after training (loradrop's stages, from the guide)
    resize_recipe: str = "fro_ckpt=1,thr=-3.55"
    # How the analysis suggests blocks to chop to: "effect" switches each block off on the job's
    # sample prompts and measures (engine/lora/effect.py); "energy" reads ‖ΔW‖ off the file,
    # which follows a block's width more than its effect (docs/twin.md). Effect needs prompts.
    suggest_by: str = "effect"

    # ------------------------------------------------------------------ TOML and overrides

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "recipe") -> "Recipe":
        return cls().updated(values, source=source)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Recipe":
        return cls.from_mapping(load_toml(path), source=str(path))

    def updated(self, values: Mapping[str, Any], *, source: str = "recipe") -> "Recipe":
        """A copy with `values` applied; an unknown key or a wrong type names the problem."""
        hints = typing.get_type_hints(Recipe)
        changes = {}
        for key, value in values.items():
            if key not in hints:
                raise UserError(f"{source}: unknown recipe key {key!r}{did_you_mean(key, hints)}.")
            changes[key] = _coerce(key, value, hints[key], source)
        recipe = dataclasses.replace(self, **changes)
        recipe.validate(source)
        return recipe

    def with_overrides(self, assignments: list[str], *, source: str = "--set") -> "Recipe":
        """Apply `key=value` strings; values are read as TOML (so 3e-4, true, "x", {a=1} work),
        falling back to a bare string."""
        hints = typing.get_type_hints(Recipe)
        values = {}
        for item in assignments:
            key, eq, text = item.partition("=")
            key, text = key.strip(), text.strip()
            if not eq or not key:
                raise UserError(f"{source} {item!r} is not key=value (for example --set max_train_steps=40).")
            value = parse_value(text)
            # `output_name=2024` reads as a TOML number; a string setting wants the text as typed.
            if hints.get(key) is str and not isinstance(value, str):
                value = text
            values[key] = value
        return self.updated(values, source=source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def diff(self, other: "Recipe | None" = None) -> dict[str, Any]:
        """Settings that differ from `other` (the seed's defaults when omitted)."""
        base = (other or Recipe()).to_dict()
        return {k: v for k, v in self.to_dict().items() if base[k] != v}

    # ------------------------------------------------------------------ meaning checks

    def validate(self, source: str = "recipe") -> None:
        def bad(msg: str) -> UserError:
            return UserError(f"{source}: {msg}.")

        for key in (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "network_dim",
            "conv_dim",
            "resolution",
            "dataset_repeats",
        ):
            if getattr(self, key) < 1:
                raise bad(f"{key} must be at least 1, not {getattr(self, key)}")
        for key in (
            "save_every_n_steps",
            "sample_every_n_steps",
            "multires_noise_iterations",
            "lr_warmup_steps",
            "keep_tokens",
            "max_data_loader_n_workers",
        ):
            if getattr(self, key) < 0:
                raise bad(f"{key} must be 0 or more (0 turns it off), not {getattr(self, key)}")
        # Upper bounds where a range is known: past them a run only exhausts the memory (a list of
        # 10^12 repeats, a 10^8-rank matrix) or diverges at once (a learning rate of 1e308).
        for key, most, why in _BOUNDS:
            if getattr(self, key) > most:
                raise bad(f"{key} {getattr(self, key):g} is more than {most:g} ({why}); give a smaller value")
        if abs(self.seed) >= 2**63:
            raise bad(f"seed must lie between -2^63 and 2^63, not {self.seed}")
        if not 0 < self.min_bucket_reso <= self.max_bucket_reso:
            raise bad("min_bucket_reso must be positive and at most max_bucket_reso")
        if self.enable_bucket and not self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
            # kohya refuses this too: the square bucket of side `resolution` must be a legal bucket.
            raise bad(
                f"resolution {self.resolution} must lie between min_bucket_reso and max_bucket_reso ({self.min_bucket_reso}..{self.max_bucket_reso})"
            )
        if self.bucket_reso_steps < 8 or self.bucket_reso_steps % 8:
            raise bad(
                f"bucket_reso_steps must be a multiple of 8 (the VAE's scale), not {self.bucket_reso_steps}"
            )
        choices = {
            "network_module": ("lycoris.kohya",),
            "algo": ("locon", "loha", "lokr"),
            "preset": ("full",),
            "optimizer_type": ("ClybW", "AdamW"),
            "lr_scheduler": ("cosine", "constant"),
            "mixed_precision": ("bf16", "fp16", "no"),
            "save_precision": ("fp16", "bf16", "float"),
            "save_model_as": ("safetensors",),
            "sample_sampler": ("euler_a",),
            "log_with": ("tensorboard", "none"),
            "suggest_by": ("effect", "energy"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise bad(f"{key} {getattr(self, key)!r} is not supported; use one of {', '.join(allowed)}")
        for key in ("use_scalar", "train_norm"):
            if getattr(self, key):
                raise bad(
                    f"{key}=true is not supported (files with it do not load in diffusers); set it to false"
                )
        if self.use_tucker and self.algo == "locon":
            raise bad(
                "use_tucker=true is not supported for algo locon (its lora_mid tensors do not load in diffusers); set it to false, or use algo loha or lokr"
            )
        lokr_only = [
            k
            for k, seed in (("factor", -1), ("decompose_both", False), ("full_matrix", False))
            if getattr(self, k) != seed
        ]
        if lokr_only and self.algo != "lokr":
            raise bad(
                f'{lokr_only[0]} applies to algo lokr only, not {self.algo}; leave it out or set algo = "lokr"'
            )
        if self.factor == 0 or self.factor < -1:
            raise bad(
                f"factor must be -1 (LyCORIS' most balanced split) or a positive integer, not {self.factor}"
            )
        for key in ("network_dropout", "rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise bad(f"{key} must be in [0, 1)")
        for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0 <= getattr(self, key) <= 1:
                raise bad(f"{key} must be in [0, 1], not {getattr(self, key)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f"{f.name} must be a finite number, not {value}")
        for key in (
            "learning_rate",
            "unet_lr",
            "text_encoder_lr",
            "network_alpha",
            "conv_alpha",
            "multires_noise_discount",
        ):
            if getattr(self, key) < 0:
                raise bad(f"{key} must be 0 or more, not {getattr(self, key)}")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm must be 0 (off) or more")
        if (
            not self.output_name
            or any(c in self.output_name for c in "/\\\0")
            or self.output_name.startswith(".")
        ):
            raise bad(f"output_name {self.output_name!r} must be a plain file name")
        # Names that become paths must stay where they belong: a daemon client could otherwise
        # have /etc/... read as sample prompts, or tensorboard logs written outside the outputs.
        prompts = PurePath(self.sample_prompts)
        if prompts.is_absolute() or ".." in prompts.parts or "\0" in self.sample_prompts:
            raise bad(f"sample_prompts {self.sample_prompts!r} must name a file inside the dataset folder")
        for key in ("caption_extension", "log_prefix"):
            if any(c in getattr(self, key) for c in "/\\\0"):
                raise bad(f"{key} {getattr(self, key)!r} must not contain / or \\")
        if self.zero_terminal_snr is True and self.v_parameterization is False:
            raise bad(
                'zero_terminal_snr = true needs v-prediction (epsilon cannot denoise pure noise); set v_parameterization to true or "auto"'
            )
        self._validate_optimizer_args(bad)
        unknown = set(self.lr_scheduler_args) - {"num_cycles"}
        if unknown:
            raise bad(f"lr_scheduler_args accepts num_cycles only, not {', '.join(sorted(unknown))}")
        cycles = self.lr_scheduler_args.get("num_cycles", 0.5)
        if isinstance(cycles, bool) or not isinstance(cycles, (int, float)) or not 0 < cycles < math.inf:
            raise bad(f"lr_scheduler_args num_cycles must be a positive number, not {cycles!r}")

    def _validate_optimizer_args(self, bad) -> None:
        """The optimizer's keyword arguments, checked here rather than when training starts."""
        allowed = _OPTIMIZER_ARGS[self.optimizer_type]
        for key, value in self.optimizer_args.items():
            kind = allowed.get(key)
            if kind is None:
                raise bad(
                    f"optimizer_args {key!r} is not an argument of {self.optimizer_type}; it takes {', '.join(allowed)}"
                )
            if kind == "flag":
                ok = isinstance(value, bool)
            elif kind == "betas":
                ok = (
                    isinstance(value, (list, tuple))
                    and len(value) == 2
                    and all(_number(v) and 0 <= v < 1 for v in value)
                )
            else:
                ok = (
                    _number(value)
                    and math.isfinite(value)
                    and value >= 0
                    and (kind != "positive" or value > 0)
                )
            if not ok:
                want = {
                    "flag": "true or false",
                    "betas": "two numbers in [0, 1), like [0.9, 0.999]",
                    "positive": "a positive number",
                }.get(kind, "a number, 0 or more")
                raise bad(f"optimizer_args {key} must be {want}, not {value!r}")


_MAX_RANK = 1280  # SDXL's widest layer side: a rank past min(out, in) adds nothing, and is cut to it
_BOUNDS = (  # (setting, most, why)
    ("learning_rate", 1.0, "a learning rate above 1 diverges at once"),
    ("unet_lr", 1.0, "a learning rate above 1 diverges at once"),
    ("text_encoder_lr", 1.0, "a learning rate above 1 diverges at once"),
    ("network_dim", _MAX_RANK, "SDXL's widest layer; a larger rank adds nothing"),
    ("conv_dim", _MAX_RANK, "SDXL's widest layer; a larger rank adds nothing"),
    ("network_alpha", _MAX_RANK, "the largest useful rank"),
    ("conv_alpha", _MAX_RANK, "the largest useful rank"),
    ("resolution", 4096, "four times SDXL's trained side"),
    ("max_bucket_reso", 4096, "four times SDXL's trained side"),
    ("bucket_reso_steps", 1024, "a bucket step larger than SDXL's trained side"),
    ("train_batch_size", 1024, "more than any GPU holds at SDXL's sizes"),
    ("gradient_accumulation_steps", 4096, "past any useful effective batch"),
    ("max_train_steps", 1_000_000, "weeks of training"),
    ("lr_warmup_steps", 1_000_000, "weeks of training"),
    ("dataset_repeats", 10_000, "each image listed this many times per epoch"),
    ("multires_noise_iterations", 64, "past 10 the noise no longer changes"),
    ("multires_noise_discount", 1.0, "noise that grows at each scale"),
    ("keep_tokens", 1000, "more tags than a caption holds"),
    ("max_data_loader_n_workers", 64, "threads decoding images"),
)
_OPTIMIZER_ARGS = {  # what each optimizer's constructor takes from optimizer_args
    "ClybW": {
        "betas": "betas",
        "amp_fac": "number",
        "eps": "positive",
        "weight_decay": "number",
        "centralization": "number",
        "normalization": "number",
        "normalize_channels": "flag",
    },
    "AdamW": {"betas": "betas", "eps": "positive", "weight_decay": "number", "amsgrad": "flag"},
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


SEED_VECTOR_ENTRIES = (
    21  # BASE, then SDXL's 20 UNet blocks (INP01-08, MID00-02, OUT00-08): the layout every job trains
)
MAX_BLOCK_WEIGHT = 10.0  # past it a chop scales ΔW out of fp16's range (a weight of 1e308 wrote inf)


def check_block_vector(
    text: str, source: str = "block_vector", entries: int | None = SEED_VECTOR_ENTRIES
) -> None:
    """Refuse a chop vector that cannot fit a LoRA trained here (`entries`; None: any length)
    or scales a block past MAX_BLOCK_WEIGHT, before any training is spent on its job."""
    from .lora.blocks import parse_vector

    values = parse_vector(text, None if entries is None else entries - 1)
    if entries is not None and len(values) != entries:
        raise UserError(
            f"{source} {text!r} has {len(values)} entries; a LoRA trained here has BASE and {entries - 1} UNet blocks, "
            f"so give {entries} (or a preset such as SDXL-LyC-MIDALL)."
        )
    far = next((v for v in values if abs(v) > MAX_BLOCK_WEIGHT), None)
    if far is not None:
        raise UserError(
            f"{source} {text!r} weighs a block {far:g}; give weights between {-MAX_BLOCK_WEIGHT:g} and {MAX_BLOCK_WEIGHT:g}."
        )


def did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(key: str, value: Any, hint, source: str) -> Any:
    origin = typing.get_origin(hint) or hint
    ok = True
    if origin is bool:
        ok = isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif origin is str:
        ok = isinstance(value, str)
    elif origin is dict:
        ok = isinstance(value, dict)
    elif origin is Literal:  # True == 1, so a bool choice must be the bool itself
        ok = any(
            value is c if isinstance(c, bool) else (isinstance(value, str) and value == c)
            for c in typing.get_args(hint)
        )
    if not ok:
        kind = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            str: "a string",
            dict: "a table",
            Literal: " or ".join(
                str(c).lower() if isinstance(c, bool) else repr(c) for c in typing.get_args(hint)
            ),
        }[origin]
        raise UserError(f"{source}: {key} must be {kind}, not {value!r}.")
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; expected a recipe TOML file.") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); expected a recipe TOML file.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid TOML ({e}).") from None
