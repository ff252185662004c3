"""The recipe's LyCORIS network on SDXL (LoCon, LoHa or LoKr, each optionally DoRA), built with
lycoris-lora and named as kohya names it.

lycoris names its modules after diffusers paths (`lycoris_down_blocks_0_resnets_0_conv1`); files
that A1111, ComfyUI, diffusers and the resize/chop tools read use kohya's SGM names
(`lora_unet_input_blocks_1_0_in_layers_2`). Each module is renamed through the key map when the
network is built, and saved and loaded under that name, with the tensor names LyCORIS saves per
kind (see lorafile).

The modules run in bypass form: y = W·x + op(x, ΔW), a LoCon's as scale·up(down(x)). It is the
same ΔW as rebuilding W + ΔW every step, without forming a full-size weight per layer where the
factors allow it (a LoCon's, cheaper for the 3×3 convs at rank 256) and without losing ΔW to bf16
rounding of W + ΔW − W. Without dropout, the layer's forward is a lean closure over the lycoris
module's weights: lycoris' own forward picks a kernel backend on every call, which costs more
Python time than the tiny twin's whole layer and, on a GPU, ~1,700 such calls per pass would
starve the device. A LoHa's or LoKr's closure forms its ΔW with lorafile's formula (the one the
file reader uses, checked against lycoris' own in the tests). A DoRA is not a bypass add: it
follows LyCORIS' weight_decompose, y = W·x + op(x, W' − W) with W' = (W + ΔW)·m/‖W + ΔW‖, the
difference formed in fp32 (lycoris' bypass mode would drop the decomposition, so its DoRA
modules are built for its rebuild forward, which runs when dropout is on).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..lora.modules import decomposed, weight_update
from ..models import keymap
from ..models.sdxl import SDXL
from ..recipe import Recipe

UNET_TARGETS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
TE_TARGETS_MLP = ["CLIPMLP"]
TE_TARGETS_ALL = ["CLIPMLP", "CLIPAttention"]


@dataclass(frozen=True)
class Preset:
    """The modules the network adapts, in the fields of a LyCORIS preset file (what its
    `preset=FILE.toml` network arg reads). None of LyCORIS' named presets is this set: its
    "full" also adapts the text encoders' attention, conv_in, conv_out and time_embedding."""

    unet_target_module: tuple[str, ...]
    text_encoder_target_module: tuple[str, ...]
    unet_target_name: tuple[str, ...] = ()
    text_encoder_target_name: tuple[str, ...] = ()
    enable_conv: bool = True

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> "Preset":
        return cls(
            tuple(UNET_TARGETS), tuple(TE_TARGETS_ALL if recipe.text_encoder_attention else TE_TARGETS_MLP)
        )


class LoConNetwork(nn.Module):
    """The recipe's adapters (algo locon, loha or lokr; DoRA with dora_wd) on the UNet and both
    text encoders, keyed by kohya name."""

    def __init__(self, model: SDXL, recipe: Recipe, *, multiplier: float = 1.0):
        super().__init__()
        self.components: dict[str, str] = {}  # kohya name -> "unet" | "te1" | "te2"
        self.dropout = bool(recipe.network_dropout or recipe.rank_dropout or recipe.module_dropout)
        self._lycoris = []
        mods: dict[str, nn.Module] = {}
        preset = Preset.for_recipe(recipe)
        te = preset.text_encoder_target_module
        for comp, targets in (("unet", preset.unet_target_module), ("te1", te), ("te2", te)):
            root = model.component(comp)
            net = _create(root, list(targets), recipe, multiplier)
            paths = {id(m): n for n, m in root.named_modules()}
            for i, lora in enumerate(net.loras):
                lora = net.loras[i] = _cap_rank(lora, recipe, multiplier)
                name = keymap.lora_name(comp, paths[id(lora.org_module[0])], model.unet_names)
                mods[name] = lora
                self.components[name] = comp
            self._lycoris.append(net)
        # ModuleDict keys may not contain dots; kohya names have none.
        self.loras = nn.ModuleDict(mods)

    # ---------------------------------------------------------------- hooking into the model

    def apply_to(self) -> None:
        """Route each wrapped layer's forward through its adapter."""
        for lora in self.loras.values():
            if self.dropout:
                lora.apply_to()
            else:
                lora.org_module[0].forward = _lean_forward(lora)

    def restore(self) -> None:
        """Give the base model back untouched (the daemon keeps it loaded for the next job)."""
        for lora in self.loras.values():
            layer = lora.org_module[0]
            if isinstance(layer.__dict__.get("forward"), functools.partial):
                del layer.forward  # back to the class's own forward
            else:
                lora.restore()

    # ---------------------------------------------------------------- parameters

    def named_for(self, component: str) -> Iterator[tuple[str, nn.Module]]:
        return ((n, m) for n, m in self.loras.items() if self.components[n] == component)

    def param_groups(self, recipe: Recipe) -> list[dict]:
        """UNet at unet_lr, both text encoders together at text_encoder_lr (kohya's two groups).
        A component whose lr is 0 is frozen rather than given a group."""
        groups = []
        unet = [p for _, m in self.named_for("unet") for p in m.parameters()]
        te = [p for c in ("te1", "te2") for _, m in self.named_for(c) for p in m.parameters()]
        for params, lr, name in (
            (unet, recipe.unet_lr, "unet"),
            (te, recipe.text_encoder_lr, "text_encoder"),
        ):
            if lr > 0 and params:
                groups.append({"params": params, "lr": lr, "initial_lr": lr, "name": name})
            else:
                for p in params:
                    p.requires_grad_(False)
        return groups

    def trains(self, component: str) -> bool:
        return any(p.requires_grad for _, m in self.named_for(component) for p in m.parameters())

    # ---------------------------------------------------------------- kohya-format state
    #
    # After `place(device)`, every saved tensor (factors, alpha, dora_scale) is a view into one flat fp32
    # buffer laid out in the file's order (by name: the safetensors layout for one dtype). A save
    # is then one cast-and-copy of that buffer, which is already the file's payload: one device
    # transfer instead of ~5,000, and no per-tensor work on the training thread.

    def place(self, device: torch.device) -> None:
        """Move to `device` and gather the saved tensors into the flat buffer."""
        self.to(device)
        tensors = self._saved_tensors()
        self.keys = sorted(tensors)
        self.shapes = {k: tuple(tensors[k].shape) for k in self.keys}
        sizes = [tensors[k].numel() for k in self.keys]
        flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
        offset = 0
        for key, size in zip(self.keys, sizes):
            view = flat[offset : offset + size].view(self.shapes[key])
            view.copy_(tensors[key].detach())
            tensors[key].data = view  # the parameter (or buffer) now lives in the flat buffer
            offset += size
        self.flat = flat

    def _saved_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, lora in self.loras.items():
            if isinstance(lora.scalar, nn.Parameter):
                raise ValueError("use_scalar LoCons are not supported")  # the recipe refuses them
            parts = {
                **_factors(lora),
                "alpha": lora.alpha,
                **({"dora_scale": lora.dora_scale} if lora.wd else {}),
            }
            out.update({f"{name}.{part}": tensor for part, tensor in parts.items()})
        return out

    def snapshot(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A CPU copy of the flat buffer in `dtype`: the payload of a LoRA file (see `keys`)."""
        return self.flat.detach().to(device="cpu", dtype=dtype, copy=True)

    def lora_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """`<name>.<part>` for every module (`lora_down.weight`, `lora_up.weight`, `alpha` for a
        LoCon; see lorafile for the others), as LyCORIS saves them (CPU copies)."""
        return unflatten(self.snapshot(dtype or torch.float32), self.keys, self.shapes)

    @torch.no_grad()
    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        tensors = self._saved_tensors()
        if set(state) != set(tensors):
            missing = sorted(set(tensors) - set(state))[:3]
            extra = sorted(set(state) - set(tensors))[:3]
            raise ValueError(f"LoRA state does not match the network (missing {missing}, unexpected {extra})")
        for key, tensor in tensors.items():
            tensor.copy_(state[key])


def unflatten(
    flat: torch.Tensor, keys: list[str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key in keys:
        size = math.prod(shapes[key])
        out[key] = flat[offset : offset + size].view(shapes[key])
        offset += size
    return out


def _kind(lora: nn.Module) -> str:
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    return "loha" if isinstance(lora, LohaModule) else "lokr" if isinstance(lora, LokrModule) else "locon"


def _factors(lora: nn.Module) -> dict[str, nn.Parameter]:
    """A module's factor Parameters by the part names its kind is saved under (lorafile)."""
    kind = _kind(lora)
    if kind == "locon":
        return {"lora_down.weight": lora.lora_down.weight, "lora_up.weight": lora.lora_up.weight}
    if kind == "loha":
        names = [
            "hada_w1_a",
            "hada_w1_b",
            "hada_w2_a",
            "hada_w2_b",
            *(["hada_t1", "hada_t2"] if lora.tucker else []),
        ]
    else:
        names = ["lokr_w1"] if lora.use_w1 else ["lokr_w1_a", "lokr_w1_b"]
        names += (
            ["lokr_w2"] if lora.use_w2 else ["lokr_w2_a", "lokr_w2_b", *(["lokr_t2"] if lora.tucker else [])]
        )
    return {name: getattr(lora, name) for name in names}


def _lean_forward(lora: nn.Module) -> functools.partial:
    """The wrapped layer's forward through its adapter, as a closure over the module's weights."""
    layer = lora.org_module[0]
    kind = _kind(lora)
    if lora.wd:
        return functools.partial(_dora_forward, lora, layer, kind, _factors(lora))
    if kind == "locon":
        return functools.partial(_bypass_forward, lora, layer)
    return functools.partial(_update_forward, lora, layer, kind, _factors(lora))


def _layer_op(
    layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The layer's own op (a linear, or a conv with the layer's geometry) with `weight`."""
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


def _bypass_forward(lora: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A LoCon: y = W·x + scale·up(down(x)), never forming ΔW."""
    down, up = lora.lora_down.weight.to(x.dtype), lora.lora_up.weight.to(x.dtype)
    if isinstance(layer, nn.Conv2d):
        h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)
        delta = F.conv2d(h, up)
    else:
        delta = F.linear(F.linear(x, down), up)
    return _layer_op(layer, x, layer.weight, layer.bias) + delta * (lora.scale * lora.multiplier)


def _update_forward(
    lora: nn.Module, layer: nn.Module, kind: str, factors: dict[str, nn.Parameter], x: torch.Tensor
) -> torch.Tensor:
    """A LoHa or LoKr: y = W·x + op(x, ΔW), ΔW formed from the module's factors."""
    delta = weight_update(kind, factors, lora.scale * lora.multiplier).reshape(layer.weight.shape)
    return _layer_op(layer, x, layer.weight, layer.bias) + _layer_op(layer, x, delta.to(x.dtype))


def _dora_forward(
    lora: nn.Module, layer: nn.Module, kind: str, factors: dict[str, nn.Parameter], x: torch.Tensor
) -> torch.Tensor:
    """A DoRA, as LyCORIS' rebuild forward: y = W·x + op(x, W' − W), W' the decomposition of
    W + ΔW (the multiplier blends its magnitude factor), the difference formed in fp32."""
    weight = layer.weight.float()
    merged = decomposed(
        weight + weight_update(kind, factors, lora.scale).reshape(weight.shape),
        lora.dora_scale,
        lora.multiplier,
    )
    return _layer_op(layer, x, layer.weight, layer.bias) + _layer_op(layer, x, (merged - weight).to(x.dtype))


def _cap_rank(lora: nn.Module, recipe: Recipe, multiplier: float) -> nn.Module:
    """Rebuild a LoCon whose rank exceeds what its layer allows, min(out, in·k·k).

    At SDXL's widths no layer is capped (the narrowest 3×3 conv has 320·9 inputs); on the tiny
    twin a rank-256 conv on 16 channels would only add parameters that cannot change ΔW. (A
    LoHa's ΔW has rank up to r², a LoKr's is a Kronecker product: their dims are not capped.)
    """
    from lycoris.modules.locon import LoConModule

    weight = lora.org_module[0].weight
    cap = min(weight.shape[0], weight[0].numel())
    if not isinstance(lora, LoConModule) or lora.lora_dim <= cap:
        return lora
    return LoConModule(
        lora.lora_name,
        lora.org_module[0],
        multiplier,
        cap,
        float(lora.alpha),
        recipe.network_dropout,
        recipe.rank_dropout,
        recipe.module_dropout,
        weight_decompose=recipe.dora_wd,
        wd_on_out=recipe.wd_on_output,
        bypass_mode=not recipe.dora_wd,
    )


def _create(root: nn.Module, targets: list[str], recipe: Recipe, multiplier: float):
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it logs every build at INFO

    # lycoris keeps its target lists on the class: set them before every build.
    LycorisNetwork.apply_preset({"target_module": targets, "target_name": []})
    return create_lycoris(
        root,
        multiplier,
        linear_dim=recipe.network_dim,
        linear_alpha=recipe.network_alpha,
        algo=recipe.algo,
        conv_dim=recipe.conv_dim,
        conv_alpha=recipe.conv_alpha,
        dropout=recipe.network_dropout,
        rank_dropout=recipe.rank_dropout,
        module_dropout=recipe.module_dropout,
        use_tucker=recipe.use_tucker,
        factor=recipe.factor,
        decompose_both=recipe.decompose_both,
        full_matrix=recipe.full_matrix,
        dora_wd=recipe.dora_wd,
        wd_on_output=recipe.wd_on_output,
        # lycoris' bypass forward leaves weight_decompose out: a DoRA is built for its rebuild forward.
        bypass_mode=not recipe.dora_wd,
        warn_on_unmatched=False,
    )
