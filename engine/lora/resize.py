"""Resize a LoRA against its base checkpoint: resize_lora's recipe language and semantics.

Every module's ΔW is decomposed without forming it (QR of the factors, SVD of the small
product of their R factors), each singular value σ_i gets a score in log10 units,

    s_i = log10 σ_i + log10 ρ − Σ_k w_k · log10 Ref_k,

and the dimensions with s_i > T are kept, one threshold T over the whole LoRA (a module can end
with none). `size=` picks T as resize_lora does: the score of the first dimension, best first,
at which the running total of bytes reaches the target; that dimension itself is not kept
(strictly above T), so the file stays under the target. The kept part is written back as a LoRA
whose ΔW is exactly ρ times the truncated SVD, every module with the input's most common alpha
(resize_lora gives each module its own, which diffusers applies wrongly; see lorafile).

Unlike resize_lora, the base is streamed: its tensors are measured one at a time straight from
the mapped file (a helper thread, while two others decompose the modules), so the memory peak
is the LoRA plus a few modules in flight, not the checkpoint. Modules the base lacks are kept
(the same ΔW) and listed, where resize_lora stops with an error; all-zero modules are dropped, as
resize_lora does.

LoHa, LoKr and DoRA modules have no two low-rank factors to decompose: each one's change (a
DoRA's W' − W, against the base weight it adapts) is formed and decomposed whole, scored the same
way, and written as a LoCon of the kept rank. So a resize always writes a plain LoCon file, which
loads in diffusers too.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from loradrop.errors import UserError

from ..models.sdxl import check_is_sdxl
from ..tensorfile import TensorFile
from ..train.metadata import derived, derived_name
from .basekeys import BaseIndex, frobenius
from .lorafile import common_alpha, kohya_tensors, network_dims, read_lora, save_lora, with_alpha
from .modules import Decomposition, LoraModule

log = logging.getLogger(__name__)

# In resize_lora's order (it is the order of the weights in the resize_params metadata).
SCORES = ("spn_lora", "spn_ckpt", "subspace", "fro_lora", "fro_ckpt", "params")
_BASE_SCORES = ("spn_ckpt", "subspace", "fro_ckpt")
DEFAULT_RECIPE = "fro_ckpt=1,thr=-3.55"  # the guide's; resize_lora's own default is thr=-3.5
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
_DEPTH = 8  # modules decomposed ahead of the one being cut
_ACTIVE = 1e-6  # resize_lora ignores score weights this small, and drops layers below this σ_max


def format_float(v: float, digits: int = 2) -> str:
    """resize_lora's number format for file names: at most 2 decimals, no trailing zeros."""
    return f"{v:.{digits}f}".rstrip("0").rstrip(".")


@dataclass
class ResizeRecipe:
    text: str
    weights: dict[str, float]  # normalised to sum 1
    threshold: float | None  # log10 units
    target_size: float | None  # MiB; wins over the threshold
    rescale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "ResizeRecipe":
        where = f"in the resize recipe '{text}'"
        if ":" in text:
            raise UserError(
                f"':' {where} separates several recipes; loradrop resizes with one recipe at a time."
            )
        weights = dict.fromkeys(SCORES, 0.0)
        options: dict[str, float] = {}
        for part in text.split(","):
            key, eq, raw = (s.strip() for s in part.partition("="))
            if not key:
                raise UserError(f"An entry {where} is empty; separate key=value pairs with single commas.")
            if key not in weights and key not in ("thr", "size", "rescale"):
                known = ", ".join((*SCORES, "thr", "size", "rescale"))
                raise UserError(f"Unknown key '{key}' {where}; the keys are {known}.")
            if not raw:
                if key in weights and not eq:
                    weights[key] = 1.0  # a bare score name means weight 1
                    continue
                raise UserError(f"'{key}' needs a value {where} (like {key}=1).")
            try:
                value = float(raw)
            except ValueError:
                raise UserError(f"'{key}={raw}' {where} is not a number.") from None
            if not math.isfinite(value):
                raise UserError(f"'{key}={raw}' {where} is not a finite number.")
            if key in weights:
                weights[key] = value
            else:
                options[key] = value
        total = sum(weights.values())
        if total == 0:
            raise UserError(
                f"No score weight {where}; give at least one of {', '.join(SCORES)} (e.g. fro_ckpt=1)."
            )
        if "thr" not in options and "size" not in options:
            raise UserError(
                f"The resize recipe '{text}' needs a threshold (thr=-3.55) or a target size in MiB (size=32)."
            )
        if options.get("size", 1.0) <= 0 or options.get("rescale", 1.0) <= 0:
            raise UserError(f"size and rescale {where} must be positive.")
        return cls(
            text=text,
            weights={k: v / total for k, v in weights.items()},
            threshold=options.get("thr"),
            target_size=options.get("size"),
            rescale=options.get("rescale", 1.0),
        )

    def active(self, score: str) -> bool:
        return abs(self.weights[score]) > _ACTIVE

    @property
    def needs_base(self) -> bool:
        return any(self.active(s) for s in _BASE_SCORES)

    @property
    def fixed_threshold(self) -> float | None:
        return None if self.target_size is not None else self.threshold

    def file_tag(self, threshold: float) -> str:
        """`frockpt1_th-3.55`: weights by name (underscores dropped), then scale, size, threshold."""
        parts = [
            f"{k.replace('_', '')}{format_float(v)}" for k, v in sorted(self.weights.items()) if v != 0.0
        ]
        if self.rescale != 1.0:
            parts.append(f"scale{format_float(self.rescale)}")
        if self.target_size is not None:
            parts.append(f"size{format_float(self.target_size)}")
        return "_".join(parts) + f"_th{format_float(threshold)}"

    def params_json(self, threshold: float) -> str:
        """resize_lora's `resize_params` metadata: the recipe's fields and the final threshold."""
        return json.dumps(
            {
                "recipe_str": self.text,
                "weights": self.weights,
                "target_size": self.target_size,
                "threshold": threshold,
                "rescale": self.rescale,
            }
        )


@dataclass
class BaseStats:
    fro: float | None = None
    spectral: float | None = None
    weight: torch.Tensor | None = None  # kept only for the subspace score


@dataclass
class _Layer:
    name: str
    rank: int
    in_shape: tuple[int, ...]
    dec: Decomposition | None
    scores: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    kept: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def dim_params(self) -> int:
        """Parameters one kept dimension costs: a column of up and a row of down."""
        return self.dec.u.shape[0] + self.dec.down.shape[1]

    def finish(self, threshold: float, rescale: float, dtype: torch.dtype, alpha: float) -> None:
        """Keep the dimensions scoring strictly above the threshold (resize_lora's comparison), as
        LoRA tensors with the file's one `alpha`; drop the rest."""
        mask = self.scores > threshold
        self.kept = int(mask.sum())
        if self.kept:
            d = self.dec
            self.tensors = kohya_tensors(
                self.name,
                d.u[:, mask],
                d.s[mask] * rescale,
                d.vh(mask),
                self.in_shape,
                alpha / self.kept,
                dtype,
            )
        self.dec = None


@dataclass
class ResizeReport:
    path: Path
    threshold: float
    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)  # module → (rank in, rank out)
    zero: list[str] = field(default_factory=list)  # all-zero modules, dropped
    unchanged: list[str] = field(default_factory=list)  # the base lacks them: copied as they were
    params_in: int = 0
    params_out: int = 0

    def lines(self) -> list[str]:
        kept = [r for r in self.ranks.values() if r[1] > 0]
        out = [
            f"threshold {format_float(self.threshold, 3)}: kept {sum(r[1] for r in kept)} of {sum(r[0] for r in self.ranks.values())} "
            f"dimensions in {len(kept)} of {len(self.ranks)} modules",
            f"parameters {self.params_in:,} -> {self.params_out:,}",
        ]
        if self.zero:
            out.append(f"{len(self.zero)} all-zero modules dropped (e.g. {self.zero[0]})")
        if self.unchanged:
            out.append(
                f"{len(self.unchanged)} modules the base lacks, kept unchanged: {', '.join(self.unchanged)}"
            )
        out.append(f"wrote {self.path}")
        return out


def spectral_norm(w: torch.Tensor, iters: int = 64) -> float:
    """σ_max by power iteration (resize_lora runs 64 rounds of svd_lowrank with q=1; a fixed
    start vector makes ours repeatable)."""
    m = w.reshape(w.shape[0], -1).float()
    g = torch.Generator(device=m.device).manual_seed(0)
    v = torch.randn(m.shape[1], generator=g, device=m.device, dtype=m.dtype)
    sigma = 0.0
    for _ in range(iters):
        u = m @ v
        u /= u.norm().clamp_min(1e-30)
        v = m.T @ u
        new = float(v.norm())
        if new == 0.0 or abs(new - sigma) <= 1e-7 * new:
            return new
        v /= new
        sigma = new
    return sigma


def _base_stats(index: BaseIndex, recipe: ResizeRecipe, device: torch.device) -> Callable[[str], BaseStats]:
    """What the recipe needs of a module's base weight, read from the checkpoint on each call."""

    def stats(name: str) -> BaseStats:
        out = BaseStats()
        if not recipe.needs_base:
            return out
        # Measured straight from the mapped file: no copy of a weight that is only summed.
        with index.mapped(name) as mapped:
            w = mapped.to(device) if device.type != "cpu" else mapped
            if recipe.active("fro_ckpt"):
                out.fro = frobenius(w)
            if recipe.active("spn_ckpt"):
                out.spectral = spectral_norm(w)
            if recipe.active("subspace"):
                out.weight = w.clone() if w is mapped else w
        return out

    return stats


def _ahead(pool: ThreadPoolExecutor, fn: Callable, items: list, depth: int) -> Iterator:
    """fn(item) for each item in order, the pool working up to `depth` items ahead of the
    consumer: module costs vary a hundredfold, so a lockstep pipeline would wait on the
    slower side at every module instead of once at the end."""
    pending: collections.deque = collections.deque()
    queued = iter(items)
    for item in itertools.islice(queued, depth):
        pending.append(pool.submit(fn, item))
    while pending:
        result = pending.popleft().result()
        for item in itertools.islice(queued, 1):
            pending.append(pool.submit(fn, item))
        yield result


@contextlib.contextmanager
def _one_torch_thread_per_caller() -> Iterator[None]:
    """Run torch kernels single-threaded in every thread of the resize. Threads that each fork
    an OpenMP team over the same cores (or over a core another process holds) spin in its
    barriers: measured 10x slower on this project's 2-core machine than one kernel thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _scores(recipe: ResizeRecipe, layer: _Layer, stats: BaseStats) -> torch.Tensor:
    """resize_lora's score, term by term in its order (so ties fall the same way)."""
    w = recipe.weights
    d = layer.dec
    s = d.s
    scores = torch.log10(s) + math.log10(recipe.rescale)
    if recipe.active("subspace"):
        base = stats.weight.reshape(stats.weight.shape[0], -1).to(s.dtype)
        along = ((d.u.T @ base) * d.vh()).sum(dim=1)  # u_iᵀ W v_i
        scores -= w["subspace"] * torch.log10(along.abs())
    if recipe.active("spn_ckpt"):
        scores -= w["spn_ckpt"] * math.log10(stats.spectral)
    if recipe.active("spn_lora"):
        scores -= w["spn_lora"] * torch.log10(s[0])
    if recipe.active("fro_ckpt"):
        scores -= w["fro_ckpt"] * math.log10(stats.fro)
    if recipe.active("fro_lora"):
        scores -= w["fro_lora"] * torch.log10(torch.linalg.vector_norm(s))
    if recipe.active("params"):
        scores -= w["params"] * math.log10(layer.dim_params)
    return scores


def _size_threshold(layers: list[_Layer], budget: float, elem: int) -> float:
    """resize_lora's size threshold: with every dimension sorted best first, the score of the
    first one at which the running total of bytes reaches `budget` (a total equal to the budget
    counts as reaching it). Keeping scores strictly above it keeps the dimensions before that
    one, and of equal scores none, so the kept bytes stay below the budget."""
    if not layers:
        return -math.inf
    scores = torch.cat([layer.scores.cpu() for layer in layers])
    sizes = torch.cat(
        [torch.full((layer.scores.shape[0],), elem * layer.dim_params, dtype=torch.int64) for layer in layers]
    )
    scores, order = scores.sort(descending=True)
    total = sizes[order].cumsum(0)
    if budget >= total[-1]:
        return -math.inf
    # The first position where the running total reaches the budget (totals are whole bytes).
    first = torch.searchsorted(total, torch.tensor([max(math.ceil(budget), 0)], dtype=torch.int64))
    return float(scores[int(first[0])])


def resize(
    base: str | os.PathLike,
    lora: str | os.PathLike,
    recipe: str | ResizeRecipe = DEFAULT_RECIPE,
    out_dir: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "fp16",
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ResizeReport:
    """Resize `lora` against the SDXL checkpoint `base`; write `<stem>_<recipe>_th<T>.safetensors`
    into `out_dir` (default: beside the LoRA) and return what was done. `progress(done, total)`
    is called after each module."""
    recipe = recipe if isinstance(recipe, ResizeRecipe) else ResizeRecipe.parse(recipe)
    out_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = torch.device(device or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for, but this machine has no usable CUDA GPU; use --device cpu."
        )
    lf = read_lora(lora)
    alpha = common_alpha((lf.module(n).alpha for n in lf.names), out_dtype)
    report = ResizeReport(path=Path(), threshold=math.nan)
    with torch.no_grad():
        layers = _decompose_and_score(
            lf, Path(base).expanduser(), recipe, device, out_dtype, alpha, report, progress
        )
        tensors: dict[str, torch.Tensor] = {}
        for name in report.unchanged:
            log.warning(
                "%s: the base has no weight for LoRA module %s; it is kept unchanged.", Path(base).name, name
            )
            # The same ΔW: a LoCon with the file's alpha, a LoHa or LoKr as it was.
            tensors.update(
                with_alpha(lf.tensors, name, alpha)
                if lf.module(name).kind == "locon"
                else {k: lf.tensors[k] for k in lf.keys_of(name)}
            )
        threshold = recipe.fixed_threshold
        if threshold is None:
            elem = torch.empty(0, dtype=out_dtype).element_size()
            # Modules kept unchanged are in the file too, so they count against the target.
            budget = recipe.target_size * (1 << 20) - sum(
                t.numel() * t.element_size() for t in tensors.values()
            )
            threshold = _size_threshold(layers, budget, elem)
            for layer in layers:
                layer.finish(threshold, recipe.rescale, out_dtype, alpha)
    for layer in layers:
        report.ranks[layer.name] = (layer.rank, layer.kept)
        tensors.update(layer.tensors)
    report.threshold = threshold
    report.params_in = sum(t.numel() for t in lf.tensors.values())
    report.params_out = sum(t.numel() for t in tensors.values())
    suffix = "_" + recipe.file_tag(threshold)
    metadata = derived(lf.metadata, derived_name(lf.path, suffix))
    metadata["resize_params"] = recipe.params_json(threshold)
    metadata["ss_network_dim"], metadata["ss_network_alpha"] = network_dims(tensors)
    folder = Path(out_dir).expanduser() if out_dir is not None else lf.path.parent
    report.path = folder / f"{lf.path.stem}{suffix}.safetensors"
    save_lora(report.path, tensors, metadata)
    return report


def _decompose_and_score(
    lf, base: Path, recipe: ResizeRecipe, device, out_dtype, alpha: float, report: ResizeReport, progress
) -> list[_Layer]:
    """Decompose and score every module the base has, streaming the base in file order; with a
    fixed threshold each module is cut at once, so only the kept part stays in memory."""
    layers = []
    with TensorFile(base, what="an SDXL base checkpoint (.safetensors)") as tf:
        check_is_sdxl(tf, ("unet", "te1", "te2"))
        index = BaseIndex(tf)
        report.unchanged = [n for n in lf.names if n not in index]
        dora = next((n for n in report.unchanged if lf.module(n).dora_scale is not None), None)
        if dora is not None:
            raise UserError(
                f"{lf.path} module {dora} is a DoRA, whose change depends on the base weight, and {tf.path} has no weight for it; resize against the model it was trained on."
            )
        present = sorted((n for n in lf.names if n in index), key=lambda n: index[n].offset)
        for name in present:
            _check_shape(lf.module(name), index[name].shape, lf.path, tf.path)
        # Each thread runs its torch kernels single-threaded. One reads and measures the base
        # tensors, far ahead (a float or two each); two decompose, score and cut the modules a
        # few ahead of this one, which collects them in order. The subspace score needs a whole
        # base weight, so with it each module's weight is read by the thread that cuts it.
        measure = _base_stats(index, recipe, device)
        with (
            _one_torch_thread_per_caller(),
            ThreadPoolExecutor(1, "resize-base") as reader,
            ThreadPoolExecutor(2, "resize-svd") as solver,
        ):
            streamed = not recipe.active("subspace")
            ahead = {name: reader.submit(measure, name) for name in present} if streamed else {}

            def cut(name: str) -> tuple[LoraModule, _Layer | None]:
                module = lf.module(name)
                dec = module.decompose(
                    device, _base_weight(index, name, device) if module.dora_scale is not None else None
                )
                if dec.s.numel() == 0 or float(dec.s[0]) < _ACTIVE:
                    return module, None
                layer = _Layer(name, module.rank, tuple(index[name].shape[1:]), dec)
                layer.scores = _scores(recipe, layer, ahead.pop(name).result() if streamed else measure(name))
                if recipe.fixed_threshold is not None:
                    layer.finish(recipe.fixed_threshold, recipe.rescale, out_dtype, alpha)
                return module, layer

            try:
                for done, (module, layer) in enumerate(_ahead(solver, cut, present, _DEPTH), 1):
                    if layer is None:
                        log.warning(
                            "LoRA module %s is all zeroes (rank %d); it is dropped.", module.name, module.rank
                        )
                        report.zero.append(module.name)
                        report.ranks[module.name] = (module.rank, 0)
                    else:
                        layers.append(layer)
                    if progress:
                        progress(done, len(present))
            finally:
                for future in list(ahead.values()):  # an error or a cancel: stop reading the base
                    future.cancel()
    return layers


def _base_weight(index: BaseIndex, name: str, device: torch.device) -> torch.Tensor:
    """The base weight a module adapts, whole, in fp32 on `device` (a DoRA's change needs it)."""
    with index.mapped(name) as mapped:
        return mapped.to(device=device, dtype=torch.float32, copy=True)


def _check_shape(module, shape: tuple[int, ...], lora_path: Path, base_path: Path) -> None:
    fits = module.out_features == shape[0] and math.prod(module.in_shape) == math.prod(shape[1:])
    if not fits:
        raise UserError(
            f"{lora_path} module {module.name} is {module.out_features}x{list(module.in_shape)}, but the base weight in "
            f"{base_path} is {list(shape)}; the LoRA was trained on another model family."
        )
