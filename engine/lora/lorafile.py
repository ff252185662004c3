"""kohya LoRA/LoCon files: per-module groups, the ΔW they stand for, and writing them back.

A kohya file names each adapted module `lora_unet_<LDM path>`, `lora_te1_<path>` or
`lora_te2_<path>` (dots turned into underscores) and stores three tensors per module:
`.lora_down.weight` (r × in, or r × in × kh × kw for a LoCon conv), `.lora_up.weight` (out × r,
or out × r × 1 × 1) and `.alpha`. The module adds ΔW = (alpha / r) · up · down to the base weight.

Other adapter formats carry other tensors; they are refused by name, in one sentence, because
every tool here (resize, chop, apply) would silently drop or misread them.

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

DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"
PARTS = {DOWN: "down", UP: "up", ALPHA: "alpha"}
PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_")

# (marker in a key, what the file is, what to do about it)
_FOREIGN = (
    ("hada_w", "is a LoHa (LyCORIS hada_* tensors)", "train a LoCon (algo=locon) to use it here"),
    ("lokr_w", "is a LoKr (LyCORIS lokr_* tensors)", "train a LoCon (algo=locon) to use it here"),
    (".lora_mid.", "is a Tucker-decomposed LoCon (lora_mid tensors)", "retrain it with use_tucker=False"),
    ("dora_scale", "is a DoRA (dora_scale tensors)", "retrain it with dora_wd=False"),
    (".lora_A.", "is in diffusers/PEFT format (lora_A/lora_B tensors)", "convert it to kohya format first"),
    (".lora_B.", "is in diffusers/PEFT format (lora_A/lora_B tensors)", "convert it to kohya format first"),
)
_SUPPORTED = "loradrop handles plain kohya LoRA/LoCon files (lora_down, lora_up, alpha)"


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, part) for a kohya LoRA tensor name, None for anything else."""
    for suffix, part in PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def check_keys(keys: Iterable[str], path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Refuse anything but an SDXL kohya LoRA/LoCon (by key names alone); return
    {module: {part: key}}."""
    keys = list(keys)
    if not keys:
        raise UserError(f"{path} holds no tensors; expected a LoRA file.")
    for marker, what, todo in _FOREIGN:
        if any(marker in k for k in keys):
            raise UserError(f"{path} {what}, which loradrop cannot resize, chop or apply; {todo}.")
    if any(k.startswith(("model.diffusion_model.", "conditioner.embedders.", "first_stage_model.")) for k in keys):
        raise UserError(f"{path} is a base checkpoint, not a LoRA; pass the LoRA file here.")
    if any(k.startswith("lora_te_") for k in keys):
        raise UserError(f"{path} is a Stable Diffusion 1.x/2.x LoRA (lora_te_ keys); loradrop works on SDXL LoRAs.")
    groups: dict[str, dict[str, str]] = {}
    for k in keys:
        split = split_key(k)
        if split is None or not k.startswith(PREFIXES):
            raise UserError(f"{path} has tensor {k}, which is not part of a kohya LoRA; {_SUPPORTED}.")
        name, part = split
        groups.setdefault(name, {})[part] = k
    for name, parts in groups.items():
        for need in ("down", "up"):
            if need not in parts:
                raise UserError(f"{path} has no lora_{need} tensor for {name}; the file is damaged or incomplete.")
    return groups


@dataclass
class LoraModule:
    """One adapted module: ΔW = (alpha / rank) · up · down."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The base weight's shape after its first dimension: (in,) or (in, kh, kw)."""
        return tuple(self.down.shape[1:])

    def factors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """up (out × r) and down (r × in·kh·kw) as fp32 matrices."""
        up = self.up.to(device=device, dtype=torch.float32).reshape(self.up.shape[0], -1)
        down = self.down.to(device=device, dtype=torch.float32).reshape(self.rank, -1)
        if up.shape[1] != self.rank:
            raise UserError(f"LoRA module {self.name} has lora_up of shape {list(self.up.shape)} for rank {self.rank}; the file is damaged.")
        return up, down

    def delta(self, device=None) -> torch.Tensor:
        """ΔW as an fp32 (out × in·kh·kw) matrix."""
        up, down = self.factors(device)
        return (up * self.scale) @ down

    def norm(self) -> float:
        """‖ΔW‖_F without forming ΔW: ‖B·A‖² = Σ (BᵀB) ∘ (A·Aᵀ), two r × r Gram matrices."""
        up, down = self.factors()
        gram = (up.T @ up).double() * (down @ down.T).double()
        return abs(self.scale) * float(gram.sum().clamp_min(0.0).sqrt())

    def decompose(self, device=None) -> "Decomposition":
        """ΔW's singular values and left vectors without forming ΔW: QR of up, R of downᵀ, and the
        SVD of the small product of the two R factors. Right vectors come later, and only for the
        dimensions asked for (forming downᵀ's Q would be the costliest step of a resize)."""
        up, down = self.factors(device)
        qu, ru = torch.linalg.qr(up)
        rd = torch.linalg.qr(down.T, mode="r").R
        uc, s, _ = torch.linalg.svd(ru @ rd.T, full_matrices=False)
        return Decomposition(qu @ uc, s * abs(self.scale), up * self.scale, down)


@dataclass
class Decomposition:
    """ΔW = U · diag(S) · Vh (S descending, alpha/rank included), Vh on demand."""

    u: torch.Tensor  # out × k
    s: torch.Tensor  # k
    up: torch.Tensor  # scale · up, out × r
    down: torch.Tensor  # r × in·kh·kw

    def vh(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of Vh (all, or those selected by a mask or indices): v_iᵀ = u_iᵀ·ΔW / σ_i.

        Rows are renormalised: for a kept dimension this only removes rounding; a dimension
        with σ ≈ 0 (of a rank-deficient ΔW) gets some unit direction, or zeros when σ = 0.
        """
        u = self.u if keep is None else self.u[:, keep]
        rows = (u.T @ self.up) @ self.down
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        return torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(rows.dtype).tiny), rows)


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


def with_alpha(parts: Mapping[str, torch.Tensor], name: str, alpha: float, factor: float = 1.0) -> dict[str, torch.Tensor]:
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


def network_dims(tensors: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """ss_network_dim / ss_network_alpha of a file's tensors: the common value, or kohya's "Dynamic"."""
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(DOWN)}
    alphas = {float(t.float()) for k, t in tensors.items() if k.endswith(ALPHA)}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic" if ranks else "0"
    alpha = str(alphas.pop()) if len(alphas) == 1 else "Dynamic" if alphas else "0"
    return dim, alpha


def kohya_tensors(name: str, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, in_shape: tuple[int, ...], scale: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
        down, up = self.tensors[parts["down"]], self.tensors[parts["up"]]
        # kohya reads a missing alpha as alpha = rank (scale 1).
        alpha = float(self.tensors[parts["alpha"]].float().item()) if "alpha" in parts else float(down.shape[0])
        return LoraModule(name, down, up, alpha)


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a kohya LoRA/LoCon file whole (LoRAs are small), refusing other adapter formats."""
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


def _hashes(layout: tensorfile.Layout, payload: memoryview, metadata: Mapping[str, str] | None) -> tuple[str, str]:
    # Our serialisation has the library's layout and header length, so the file kohya hashes is
    # our header (with the ss_* metadata alone) followed by our payload.
    ss = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    head = layout.header(ss)
    whole = len(head) + len(payload)
    tail = payload[max(_LEGACY_START - len(head), 0): max(min(_LEGACY_END, whole) - len(head), 0)]
    window = head[_LEGACY_START:_LEGACY_END] + bytes(tail)
    return hashlib.sha256(payload).hexdigest(), hashlib.sha256(window).hexdigest()[:8]


def save_lora(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write a LoRA atomically with its hashes updated; return the metadata written."""
    layout = tensorfile.Layout({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    return save_lora_payload(path, layout, tensorfile.payload(tensors, layout.order), metadata)


def save_lora_payload(path: str | os.PathLike, layout: tensorfile.Layout, payload: torch.Tensor | memoryview, metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """`save_lora` for tensors already laid out as the file's payload (the trainer's flat buffer):
    `payload` holds their bytes in `layout`'s order."""
    if isinstance(payload, torch.Tensor):
        payload = memoryview(payload.reshape(-1).view(torch.uint8).numpy())
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = _hashes(layout, payload, meta)
    tensorfile.write_payload(path, layout, payload, meta)
    return meta
