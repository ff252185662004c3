"""kohya-named LyCORIS files (LoCon, LoHa, LoKr, each optionally DoRA): reading them into
per-module groups, and writing files back; each module's math is engine/lora/modules.py.

A kohya file names each adapted module `lora_unet_<LDM path>`, `lora_te1_<path>` or
`lora_te2_<path>` (dots turned into underscores) and stores its tensors as `<module>.<part>`. The
parts depend on the adapter kind; they are the names LyCORIS saves and ComfyUI
(comfy/weight_adapter/lora.py, loha.py, lokr.py) and A1111 (extensions-builtin/Lora/network_lora.py,
network_hada.py, network_lokr.py) read:

- LoCon: `lora_down.weight` (r × in, or r × in × kh × kw), `lora_up.weight` (out × r[ × 1 × 1]);
  ΔW = s · up · down.
- LoHa: `hada_w1_a` (out × r), `hada_w1_b` (r × in·kh·kw), `hada_w2_a`, `hada_w2_b`;
  ΔW = s · (w1_a · w1_b) ⊙ (w2_a · w2_b). With Tucker (3×3 convs) `hada_t1`, `hada_t2`
  (r × r × kh × kw) rebuild each factor from w?_a (r × out) and w?_b (r × in).
- LoKr: `lokr_w1` (a × c) or `lokr_w1_a` · `lokr_w1_b`, and `lokr_w2` (b × d[ × kh × kw]) or
  `lokr_w2_a` · `lokr_w2_b` (rebuilt through `lokr_t2` with Tucker); ΔW = s · w1 ⊗ w2, so
  out = a·b and in = c·d. "Full matrix" LoKr stores both halves whole.

s = alpha / r, with r the rank of the factored parts (LoKr: w2's, else w1's); an unfactored LoKr
has s = 1 whatever its alpha, and a missing alpha means s = 1 (kohya's alpha = rank), as every
loader reads them.

A module with `dora_scale` is a DoRA (LyCORIS' weight_decompose): it does not add ΔW, it replaces
the weight by W' = (W + ΔW) · m / ‖W + ΔW‖, the norm taken per output row when dora_scale is
(out × 1 …) (LyCORIS' wd_on_output=True) or per input column when it is (1 × in …). Its change
W' − W depends on the base weight.

Other adapter formats are refused by name, in one sentence, because every tool here (resize,
chop, apply) would silently drop or misread them.

Files are written with kohya's two additional-network hashes (`sshs_model_hash`,
`sshs_legacy_hash`), recomputed for the tensors actually written, as sd-scripts does on save.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from loradrop.errors import UserError

from .. import tensorfile
from .modules import LoraModule

DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"
PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_")

# Each kind's factor tensors (the part of a key after the module name), and the two every kind may have.
KIND_PARTS = {
    "locon": ("lora_down.weight", "lora_up.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
SHARED_PARTS = ("alpha", "dora_scale")
KIND_NAMES = {"locon": "LoRA/LoCon", "loha": "LoHa", "lokr": "LoKr"}
_PARTS = {part for parts in KIND_PARTS.values() for part in parts} | set(SHARED_PARTS)

# (marker in a key, what the file is, what to do about it)
_FOREIGN = (
    (".lora_mid.", "is a Tucker-decomposed LoCon (lora_mid tensors)", "retrain it with use_tucker=False"),
    (".lora_A.", "is in diffusers/PEFT format (lora_A/lora_B tensors)", "convert it to kohya format first"),
    (".lora_B.", "is in diffusers/PEFT format (lora_A/lora_B tensors)", "convert it to kohya format first"),
)
_SUPPORTED = "loradrop handles kohya LoRA/LoCon, LoHa and LoKr files, with or without DoRA"


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, part) for a tensor of a kohya-named LyCORIS file, None for anything else."""
    name, dot, part = key.partition(".")
    return (name, part) if dot and part in _PARTS else None


def kind_of(parts: Iterable[str]) -> str:
    """The adapter kind of a module from its part names (a checked group, see check_keys)."""
    parts = set(parts)
    return next(kind for kind, names in KIND_PARTS.items() if parts.intersection(names))


def check_keys(keys: Iterable[str], path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Refuse anything but an SDXL kohya-named LoCon, LoHa or LoKr file (by key names alone);
    return {module: {part: key}}."""
    keys = list(keys)
    if not keys:
        raise UserError(f"{path} holds no tensors; expected a LoRA file.")
    for marker, what, todo in _FOREIGN:
        if any(marker in k for k in keys):
            raise UserError(f"{path} {what}, which loradrop cannot resize, chop or apply; {todo}.")
    if any(
        k.startswith(("model.diffusion_model.", "conditioner.embedders.", "first_stage_model.")) for k in keys
    ):
        raise UserError(f"{path} is a base checkpoint, not a LoRA; pass the LoRA file here.")
    if any(k.startswith("lora_te_") for k in keys):
        raise UserError(
            f"{path} is a Stable Diffusion 1.x/2.x LoRA (lora_te_ keys); loradrop works on SDXL LoRAs."
        )
    groups: dict[str, dict[str, str]] = {}
    for k in keys:
        split = split_key(k)
        if split is None or not k.startswith(PREFIXES):
            raise UserError(f"{path} has tensor {k}, which is not part of a kohya LoRA; {_SUPPORTED}.")
        name, part = split
        groups.setdefault(name, {})[part] = k
    for name, parts in groups.items():
        _check_module(name, set(parts), path)
    return groups


def _check_module(name: str, parts: set[str], path) -> None:
    kinds = [kind for kind, names in KIND_PARTS.items() if parts.intersection(names)]
    if not kinds:
        raise UserError(
            f"{path} has only {', '.join(sorted(parts))} for {name}; the file is damaged or incomplete."
        )
    if len(kinds) > 1:
        raise UserError(
            f"{path} mixes {' and '.join(KIND_NAMES[k] for k in kinds)} tensors in {name}; the file is damaged."
        )
    kind = kinds[0]
    if kind == "locon":
        need = ["lora_down.weight", "lora_up.weight"]
    elif kind == "loha":
        tucker = "hada_t1" in parts or "hada_t2" in parts
        need = [
            "hada_w1_a",
            "hada_w1_b",
            "hada_w2_a",
            "hada_w2_b",
            *(("hada_t1", "hada_t2") if tucker else ()),
        ]
    else:
        need = []
        for whole in ("lokr_w1", "lokr_w2"):
            if whole not in parts:  # then both halves of its factorisation
                halves = [f"{whole}_a", f"{whole}_b"]
                need += halves if parts.intersection(halves) else [whole]
        if "lokr_t2" in parts:
            need += ["lokr_w2_a", "lokr_w2_b"]
    missing = [p for p in need if p not in parts]
    if missing:
        raise UserError(
            f"{path} is a {KIND_NAMES[kind]} with no {missing[0]} tensor for {name}; the file is damaged or incomplete."
        )


# ------------------------------------------------------------------ one alpha for the whole file
#
# kohya, ComfyUI and A1111 scale each module by its own alpha / rank. diffusers (through peft)
# does not: it turns the file's alphas into one lora_alpha (the most common) plus an
# alpha_pattern keyed by module names that miss its UNet attention and half of CLIP-L's modules,
# so those are scaled with the common alpha instead of their own. A file whose modules all
# share one alpha loads right everywhere, so resize and chop write every module with the same
# alpha and fold the module's own scale into lora_up: ΔW and the ranks do not change.


def common_alpha(alphas: Iterable[float], dtype: torch.dtype = torch.float16) -> float:
    """The alpha a file's modules are written with: the most common positive one (so a file
    that already has one alpha keeps it, and most modules keep their tensors), as `dtype`
    stores it; 1.0 when there is none."""
    counts = collections.Counter(a for a in alphas if a > 0 and math.isfinite(a))
    alpha = counts.most_common(1)[0][0] if counts else 1.0
    return float(torch.tensor(alpha, dtype=dtype))


def with_alpha(
    parts: Mapping[str, torch.Tensor], name: str, alpha: float, factor: float = 1.0
) -> dict[str, torch.Tensor]:
    """One module's tensors rewritten for `alpha`, its ΔW times `factor`: only lora_up changes
    (by own alpha / `alpha` · factor) and the alpha tensor; tensors that need no change are
    returned as they are, bit for bit. `parts` holds the module's tensors by full key."""
    down, up = parts[name + DOWN], parts[name + UP]
    alpha_t = parts.get(name + ALPHA)
    # kohya reads a missing alpha as alpha = rank (scale 1).
    own = float(alpha_t.float()) if alpha_t is not None else float(down.shape[0])
    ratio = own / alpha * factor
    out = {name + DOWN: down, name + UP: up if ratio == 1.0 else (up.float() * ratio).to(up.dtype)}
    dtype = alpha_t.dtype if alpha_t is not None else up.dtype
    out[name + ALPHA] = alpha_t if alpha_t is not None and own == alpha else torch.tensor(alpha, dtype=dtype)
    return out


# The factor of a LoHa or LoKr whose scaling by w scales ΔW by w: ΔW is linear in each factor,
# so a block weight scales one of them (scaling every tensor, as chop_blocks does, gives w^n).
_LINEAR_FACTOR = {"loha": ("hada_w1_a",), "lokr": ("lokr_w1", "lokr_w1_a")}


def weighed(
    parts: Mapping[str, torch.Tensor], name: str, kind: str, factor: float
) -> dict[str, torch.Tensor]:
    """The one tensor of a LoHa or LoKr module that, rewritten, makes its ΔW `factor` times as
    large: only the first Hadamard half's hada_w1_a, or the first Kronecker half (lokr_w1 or
    lokr_w1_a). `parts` holds the module's tensors by full key."""
    key = next(f"{name}.{part}" for part in _LINEAR_FACTOR[kind] if f"{name}.{part}" in parts)
    return {key: (parts[key].float() * factor).to(parts[key].dtype)}


def network_dims(tensors: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """ss_network_dim / ss_network_alpha of a file's tensors: the common value, or kohya's "Dynamic"."""
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(DOWN)}
    alphas = {float(t.float()) for k, t in tensors.items() if k.endswith(ALPHA)}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic" if ranks else "0"
    alpha = str(alphas.pop()) if len(alphas) == 1 else "Dynamic" if alphas else "0"
    return dim, alpha


def kohya_tensors(
    name: str,
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    in_shape: tuple[int, ...],
    scale: float,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The three tensors of a module whose ΔW is U·diag(S)·Vh, stored with alpha/rank = `scale`.

    The singular values are split evenly between the factors (√ on each side), so neither factor
    under- or overflows in fp16; alpha = scale · k keeps a loader's (alpha / k) equal to `scale`.
    """
    k = s.shape[0]
    root = torch.sqrt(s / abs(scale))
    down = (vh * root[:, None]).reshape(k, *in_shape)
    up = (u * (root if scale > 0 else -root)).reshape(u.shape[0], k, *([1] * (len(in_shape) - 1)))
    return {
        name + DOWN: down.to(dtype).cpu().contiguous(),
        name + UP: up.to(dtype).cpu().contiguous(),
        name + ALPHA: torch.tensor(scale * k, dtype=dtype),
    }


@dataclass
class LoraFile:
    """A LoRA file held in memory: its metadata, raw tensors (dtypes as stored) and module groups."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]
    groups: dict[str, dict[str, str]]

    @property
    def names(self) -> list[str]:
        return list(self.groups)

    def keys_of(self, name: str) -> list[str]:
        return list(self.groups[name].values())

    def module(self, name: str) -> LoraModule:
        parts = self.groups[name]
        factors = {part: self.tensors[key] for part, key in parts.items() if part not in SHARED_PARTS}
        alpha = float(self.tensors[parts["alpha"]].float().item()) if "alpha" in parts else None
        dora = self.tensors[parts["dora_scale"]] if "dora_scale" in parts else None
        return LoraModule(name, kind_of(factors), factors, alpha, dora)


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a kohya-named LoCon, LoHa or LoKr file whole (LoRAs are small), refusing other
    adapter formats."""
    path = Path(path).expanduser()
    with tensorfile.TensorFile(path, what="a LoRA (.safetensors)") as tf:
        groups = check_keys(tf.keys(), path)
        return LoraFile(path, dict(tf.metadata), tf.read_all(), groups)


# ------------------------------------------------------------------ writing, with kohya's hashes


_LEGACY_START, _LEGACY_END = 0x100000, 0x110000


def lora_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya sd-scripts computes them.

    Both hash the file that `safetensors.torch.save` makes from the tensors and only the `ss_*`
    metadata (so later user metadata does not change them): the model hash is the sha256 of the
    bytes after the header, the legacy hash the first 8 hex digits of the sha256 of the 64 KiB at
    offset 1 MiB.
    """
    layout = tensorfile.Layout({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    return _hashes(layout, tensorfile.payload(tensors, layout.order), metadata)


def _hashes(
    layout: tensorfile.Layout, payload: memoryview, metadata: Mapping[str, str] | None
) -> tuple[str, str]:
    # Our serialisation has the library's layout and header length, so the file kohya hashes is
    # our header (with the ss_* metadata alone) followed by our payload.
    ss = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    head = layout.header(ss)
    whole = len(head) + len(payload)
    tail = payload[max(_LEGACY_START - len(head), 0) : max(min(_LEGACY_END, whole) - len(head), 0)]
    window = head[_LEGACY_START:_LEGACY_END] + bytes(tail)
    return hashlib.sha256(payload).hexdigest(), hashlib.sha256(window).hexdigest()[:8]


def save_lora(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Write a LoRA atomically with its hashes updated; return the metadata written."""
    layout = tensorfile.Layout({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    return save_lora_payload(path, layout, tensorfile.payload(tensors, layout.order), metadata)


def save_lora_payload(
    path: str | os.PathLike,
    layout: tensorfile.Layout,
    payload: torch.Tensor | memoryview,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """`save_lora` for tensors already laid out as the file's payload (the trainer's flat buffer):
    `payload` holds their bytes in `layout`'s order."""
    if isinstance(payload, torch.Tensor):
        payload = memoryview(payload.reshape(-1).view(torch.uint8).numpy())
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = _hashes(layout, payload, meta)
    tensorfile.write_payload(path, layout, payload, meta)
    return meta
