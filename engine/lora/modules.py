"""One module of a LoRA file as math: its change to the layer it adapts, whatever its kind.

LoCon (`lora_up · lora_down`), LoHa (the Hadamard product of two low-rank pairs, optionally
Tucker), LoKr (the Kronecker product of two factors, each whole or low-rank), each optionally
with DoRA's weight decomposition. `weight_update` is the one ΔW formula, used by the trainer's
forward (engine/train/network.py) and by every reader (resize, apply, blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from loradrop.errors import UserError


def weight_update(kind: str, parts: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
    """ΔW = scale · (the kind's product of its factors) as an out × in·kh·kw matrix, in the
    factors' dtype and differentiable: the one formula the trainer's forward and the file reader
    share, checked against LyCORIS' own modules in tests/engine/test_adapters.py."""
    p = parts
    if kind == "locon":
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        return (up.reshape(up.shape[0], -1) * scale) @ down.reshape(down.shape[0], -1)
    if kind == "loha":
        if "hada_t1" in p:
            halves = [
                _tucker(p[f"hada_t{i}"], p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]).flatten(1) for i in (1, 2)
            ]
        else:
            halves = [p[f"hada_w{i}_a"] @ p[f"hada_w{i}_b"] for i in (1, 2)]
        return (halves[0] * scale) * halves[1]
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))  # a conv's w2 keeps its kernel axes
    kron = torch.kron(w1 * scale, w2)
    return kron.reshape(kron.shape[0], -1)


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker-rebuilt factor: core (r × r × kh × kw) between wa (r × out) and wb (r × in)."""
    return torch.einsum("i j ..., j r, i p -> p r ...", core, wb, wa)


def decomposed(weight: torch.Tensor, dora_scale: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """LyCORIS' weight_decompose of a merged weight W (its own shape): W · m / (‖W‖ + eps), the
    norm per output row for an (out × 1 …) magnitude, per input column for a (1 × in …) one; at a
    multiplier μ ≠ 1 the factor becomes μ·(m/‖W‖ − 1) + 1. In fp32, as LyCORIS computes it."""
    w = weight.float()
    if dora_scale.shape[0] == w.shape[0]:
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = (
            w.transpose(0, 1)
            .reshape(w.shape[1], -1)
            .norm(dim=1)
            .reshape(w.shape[1], *[1] * (w.dim() - 1))
            .transpose(0, 1)
        )
    factor = dora_scale.float().reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
    if multiplier != 1:
        factor = multiplier * (factor - 1) + 1
    return w * factor


@dataclass
class LoraModule:
    """One adapted module of a file: its kind, its factor tensors by part (dtypes as stored), its
    alpha and, for a DoRA, its magnitude."""

    name: str
    kind: str  # "locon", "loha" or "lokr"
    parts: dict[str, torch.Tensor]  # the kind's factors (alpha and dora_scale apart)
    stored_alpha: float | None
    dora_scale: torch.Tensor | None = None

    @property
    def dim(self) -> int | None:
        """The rank alpha is divided by: of the factored parts (a LoKr's w2, else its w1); None
        for an unfactored LoKr."""
        p = self.parts
        first = {"locon": "lora_down.weight", "loha": "hada_w1_b"}.get(self.kind)
        if first:
            return p[first].shape[0]
        return next((p[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in p), None)

    @property
    def alpha(self) -> float:
        """As stored; a missing alpha reads as the rank (kohya's rule: scale 1)."""
        return self.stored_alpha if self.stored_alpha is not None else float(self.dim or 1)

    @property
    def scale(self) -> float:
        return self.alpha / self.dim if self.dim else 1.0

    @property
    def rank(self) -> int:
        """The dimensions of ΔW a resize chooses from: a LoCon's rank; for the other kinds (and a
        DoRA, whose change is not low-rank) the full min(out, in·kh·kw)."""
        if self.kind == "locon" and self.dora_scale is None:
            return self.dim
        return min(self.out_features, math.prod(self.in_shape))

    @property
    def out_features(self) -> int:
        p = self.parts
        if self.kind == "locon":
            return p["lora_up.weight"].shape[0]
        if self.kind == "loha":
            return p["hada_w1_a"].shape[1 if "hada_t1" in p else 0]
        (a, _), (b, *_) = self._kron_halves()
        return a * b

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The base weight's shape after its first dimension: (in,) or (in, kh, kw); a factored
        LoKr conv, whose w2_b holds d·kh·kw in one axis, gives (in·kh·kw,)."""
        p = self.parts
        if self.kind == "locon":
            return tuple(p["lora_down.weight"].shape[1:])
        if self.kind == "loha":
            return (p["hada_w1_b"].shape[1], *(p["hada_t1"].shape[2:] if "hada_t1" in p else ()))
        (_, c), (_, *rest) = self._kron_halves()
        return (c * rest[0], *rest[1:])

    def _kron_halves(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of a LoKr's w1 (a, c) and w2 (b, d[, kh, kw])."""
        p = self.parts
        w1 = (
            tuple(p["lokr_w1"].shape)
            if "lokr_w1" in p
            else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
        )
        if "lokr_w2" in p:
            w2 = tuple(p["lokr_w2"].shape)
        elif "lokr_t2" in p:
            w2 = (p["lokr_w2_a"].shape[1], p["lokr_w2_b"].shape[1], *p["lokr_t2"].shape[2:])
        else:
            w2 = (p["lokr_w2_a"].shape[0], p["lokr_w2_b"].shape[1])
        return w1, w2

    def update(self, device=None) -> torch.Tensor:
        """ΔW as an fp32 (out × in·kh·kw) matrix: for a DoRA, the update before the decomposition."""
        parts = {k: t.to(device=device, dtype=torch.float32) for k, t in self.parts.items()}
        return weight_update(self.kind, parts, self.scale)

    def delta(self, device=None, base: torch.Tensor | None = None) -> torch.Tensor:
        """The change the module makes to the weight it adapts, as an fp32 (out × in·kh·kw)
        matrix: ΔW, or for a DoRA W' − W, which needs that weight (`base`, in its own shape)."""
        if self.dora_scale is None:
            return self.update(device)
        if base is None:
            raise UserError(
                f"LoRA module {self.name} is a DoRA, whose change depends on the base weight; give the base model."
            )
        w = base.to(device=device, dtype=torch.float32)
        merged = decomposed(w + self.update(device).reshape(w.shape), self.dora_scale.to(device))
        return (merged - w).reshape(w.shape[0], -1)

    def factors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoCon's up (out × r) and down (r × in·kh·kw) as fp32 matrices."""
        up = (
            self.parts["lora_up.weight"].to(device=device, dtype=torch.float32).reshape(self.out_features, -1)
        )
        down = self.parts["lora_down.weight"].to(device=device, dtype=torch.float32).reshape(self.dim, -1)
        if up.shape[1] != self.dim:
            raise UserError(
                f"LoRA module {self.name} has lora_up of shape {list(up.shape)} for rank {self.dim}; the file is damaged."
            )
        return up, down

    @property
    def low_rank(self) -> bool:
        """A plain LoCon: its ΔW is known through its two factors, without forming it."""
        return self.kind == "locon" and self.dora_scale is None

    def norm(self) -> float:
        """‖ΔW‖_F; for a LoCon without forming ΔW: ‖B·A‖² = Σ (BᵀB) ∘ (A·Aᵀ), two r × r Gram
        matrices. A DoRA's is its update's: the magnitude's part needs the base weight."""
        if self.kind != "locon":
            return float(torch.linalg.matrix_norm(self.update()))
        up, down = self.factors()
        gram = (up.T @ up).double() * (down @ down.T).double()
        return abs(self.scale) * float(gram.sum().clamp_min(0.0).sqrt())

    def decompose(self, device=None, base: torch.Tensor | None = None) -> "Decomposition":
        """The singular values and left vectors of the module's change. A plain LoCon's without
        forming ΔW: QR of up, R of downᵀ, and the SVD of the small product of the two R factors
        (right vectors come later, and only for the dimensions asked for: forming downᵀ's Q would
        be the costliest step of a resize). Any other module's change (a DoRA's needs `base`) is
        formed and decomposed whole."""
        if not self.low_rank:
            u, s, vh = torch.linalg.svd(self.delta(device, base), full_matrices=False)
            return Decomposition(u, s, u * s, vh)
        up, down = self.factors(device)
        qu, ru = torch.linalg.qr(up)
        rd = torch.linalg.qr(down.T, mode="r").R
        uc, s, _ = torch.linalg.svd(ru @ rd.T, full_matrices=False)
        return Decomposition(qu @ uc, s * abs(self.scale), up * self.scale, down)


@dataclass
class Decomposition:
    """A change = U · diag(S) · Vh (S descending, alpha/rank included) = up · down, Vh on demand."""

    u: torch.Tensor  # out × k
    s: torch.Tensor  # k
    up: torch.Tensor  # out × r: a LoCon's scale · up, or U·diag(S) of a change decomposed whole
    down: torch.Tensor  # r × in·kh·kw: a LoCon's down, or Vh

    def vh(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of Vh (all, or those selected by a mask or indices): v_iᵀ = u_iᵀ·ΔW / σ_i.

        Rows are renormalised: for a kept dimension this only removes rounding; a dimension
        with σ ≈ 0 (of a rank-deficient ΔW) gets some unit direction, or zeros when σ = 0.
        """
        u = self.u if keep is None else self.u[:, keep]
        rows = (u.T @ self.up) @ self.down
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        return torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(rows.dtype).tiny), rows)
