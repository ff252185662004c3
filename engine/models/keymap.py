"""SDXL's single-file (SGM) names ↔ diffusers/transformers names, both directions.

A single-file checkpoint stores the UNet under `model.diffusion_model.` with the original LDM
names, the VAE under `first_stage_model.`, CLIP ViT-L under `conditioner.embedders.0.transformer.`
with Hugging Face names, and OpenCLIP ViT-bigG under `conditioner.embedders.1.model.` with
OpenCLIP names (one fused q/k/v projection, a transposed text projection).

A `ComponentMap` is built from the diffusers module's own parameter names, so the map covers
exactly the module that will receive the tensors. Each entry joins one SGM tensor to one or more
diffusers tensors with an operation: copy, transpose, split in q/k/v (OpenCLIP stacks q, k, v
in that order), or a 1×1 conv ↔ linear reshape (the LDM VAE's attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."

# SGM keys that real checkpoints carry but no diffusers module holds.
IGNORED_SGM_KEYS = frozenset(
    {
        TE2_PREFIX + "logit_scale",
        TE1_PREFIX + "text_model.embeddings.position_ids",
    }
)


@dataclass(frozen=True)
class Entry:
    sgm: str
    diffusers: tuple[str, ...]
    op: str  # "copy" | "transpose" | "qkv" | "conv1x1"


class ComponentMap:
    """The name map of one component (UNet, VAE, TE1 or TE2)."""

    def __init__(self, name: str, entries: Iterable[Entry]):
        self.name = name
        self.entries = list(entries)
        self.by_sgm: dict[str, Entry] = {}
        self.by_diffusers: dict[str, Entry] = {}
        for e in self.entries:
            if e.sgm in self.by_sgm:
                raise ValueError(f"two {name} tensors map to {e.sgm}")
            self.by_sgm[e.sgm] = e
            for d in e.diffusers:
                if d in self.by_diffusers:
                    raise ValueError(f"{name} tensor {d} is mapped twice")
                self.by_diffusers[d] = e

    def to_diffusers(self, sgm_key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        e = self.by_sgm[sgm_key]
        if e.op == "copy":
            return [(e.diffusers[0], tensor)]
        if e.op == "transpose":
            return [(e.diffusers[0], tensor.t().contiguous())]
        if e.op == "conv1x1":
            return [(e.diffusers[0], tensor.reshape(tensor.shape[0], tensor.shape[1]))]
        if e.op == "qkv":
            return list(zip(e.diffusers, (t.contiguous() for t in tensor.chunk(3, dim=0))))
        raise AssertionError(e.op)

    def to_sgm(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convert a whole diffusers state dict (every mapped tensor must be present)."""
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            parts = [state[d] for d in e.diffusers]
            if e.op == "copy":
                out[e.sgm] = parts[0]
            elif e.op == "transpose":
                out[e.sgm] = parts[0].t().contiguous()
            elif e.op == "conv1x1":
                out[e.sgm] = parts[0].reshape(*parts[0].shape, 1, 1)
            else:
                out[e.sgm] = torch.cat(parts, dim=0)
        return out


def _renamer(pairs: list[tuple[str, str]]) -> Callable[[str], str]:
    """Rename by the longest matching dotted prefix; a key with no prefix is kept as it is."""
    table = dict(pairs)

    def rename(key: str) -> str:
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:i]) + "."
            if head in table:
                return table[head] + key[len(head) :]
        return key

    return rename


# ---------------------------------------------------------------- UNet

_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def _resnet(d: str, s: str) -> list[tuple[str, str]]:
    return [(d + a, s + b) for a, b in _RESNET]


def unet_prefix_pairs(config: Mapping) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for every block of a UNet2DConditionModel config."""
    n = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    pairs = [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ]
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(n):
            k = i * (n + 1) + j + 1
            pairs += _resnet(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.")
            if "CrossAttn" in kind:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1."))
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (n + 1)}.0.op."))
    pairs += _resnet("mid_block.resnets.0.", "middle_block.0.")
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs += _resnet("mid_block.resnets.1.", "middle_block.2.")
    for i, kind in enumerate(config["up_block_types"]):
        attn = "CrossAttn" in kind
        for j in range(n + 1):
            k = i * (n + 1) + j
            pairs += _resnet(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.")
            if attn:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1."))
        if i < levels - 1:
            pairs.append(
                (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (n + 1) + n}.{2 if attn else 1}.")
            )
    return pairs


class UNetNames:
    """Module and tensor names of one UNet config, diffusers to SGM (used for LoRA keys too)."""

    def __init__(self, config: Mapping):
        pairs = unet_prefix_pairs(config)
        self.to_ldm = _renamer(pairs)

    def module_to_ldm(self, path: str) -> str:
        return self.to_ldm(path + ".")[:-1]


def unet_map(config: Mapping, keys: Iterable[str]) -> ComponentMap:
    names = UNetNames(config)
    return ComponentMap("UNet", (Entry(UNET_PREFIX + names.to_ldm(k), (k,), "copy") for k in keys))


# ---------------------------------------------------------------- VAE


def _vae_pairs(config: Mapping) -> list[tuple[str, str]]:
    levels = len(config["block_out_channels"])
    n = config["layers_per_block"]
    res = [("conv_shortcut.", "nin_shortcut.")]
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for side in ("encoder", "decoder"):
        for r in range(2):
            pairs.append((f"{side}.mid_block.resnets.{r}.", f"{side}.mid.block_{r + 1}."))
            pairs += [(f"{side}.mid_block.resnets.{r}.{a}", f"{side}.mid.block_{r + 1}.{b}") for a, b in res]
        attn = f"{side}.mid_block.attentions.0."
        pairs += [(attn + "group_norm.", f"{side}.mid.attn_1.norm.")]
        pairs += [
            (attn + a, f"{side}.mid.attn_1.{b}")
            for a, b in (("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
        ]
    for i in range(levels):
        for j in range(n):
            d, s = f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."
            pairs += [(d, s)] + [(d + a, s + b) for a, b in res]
        if i < levels - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        # The LDM decoder numbers its levels from the bottom up.
        up = levels - 1 - i
        for j in range(n + 1):
            d, s = f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}."
            pairs += [(d, s)] + [(d + a, s + b) for a, b in res]
        if i < levels - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    return pairs


def vae_map(config: Mapping, keys: Iterable[str]) -> ComponentMap:
    rename = _renamer(_vae_pairs(config))
    entries = []
    for k in keys:
        op = "conv1x1" if ".mid_block.attentions.0.to_" in k and k.endswith(".weight") else "copy"
        entries.append(Entry(VAE_PREFIX + rename(k), (k,), op))
    return ComponentMap("VAE", entries)


# ---------------------------------------------------------------- text encoders


def hf_text_path(path: str) -> str:
    """A CLIP text-model name in the `text_model.`-rooted layout that SGM files and kohya use.

    transformers 5 dropped the `text_model` wrapper from `CLIPTextModel` (not from the model with
    projection); names from either layout come out the same.
    """
    if path.startswith("text_model.") or path == "text_model" or path.startswith("text_projection"):
        return path
    return "text_model." + path if path else "text_model"


def te1_map(keys: Iterable[str]) -> ComponentMap:
    return ComponentMap("text encoder 1", (Entry(TE1_PREFIX + hf_text_path(k), (k,), "copy") for k in keys))


_TE2_LAYER = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
]


def te2_map(keys: Iterable[str]) -> ComponentMap:
    keys = list(keys)
    if any(not k.startswith(("text_model.", "text_projection.")) for k in keys):
        raise ValueError("text encoder 2 must be a CLIPTextModelWithProjection")
    layer = "text_model.encoder.layers."
    pairs = [
        ("text_model.embeddings.token_embedding.", "token_embedding."),
        ("text_model.final_layer_norm.", "ln_final."),
    ]
    layers = sorted({int(k[len(layer) :].split(".")[0]) for k in keys if k.startswith(layer)})
    for i in layers:
        pairs += [(f"{layer}{i}.{a}", f"transformer.resblocks.{i}.{b}") for a, b in _TE2_LAYER]
    rename = _renamer(pairs)
    entries, fused = [], set()
    for k in keys:
        if k == "text_model.embeddings.position_embedding.weight":
            entries.append(Entry(TE2_PREFIX + "positional_embedding", (k,), "copy"))
        elif k == "text_projection.weight":
            entries.append(Entry(TE2_PREFIX + "text_projection", (k,), "transpose"))
        elif ".self_attn.q_proj." in k or ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            i, kind = int(k[len(layer) :].split(".")[0]), k.rsplit(".", 1)[1]
            if (i, kind) not in fused:
                fused.add((i, kind))
                parts = tuple(f"{layer}{i}.self_attn.{p}_proj.{kind}" for p in "qkv")
                entries.append(
                    Entry(f"{TE2_PREFIX}transformer.resblocks.{i}.attn.in_proj_{kind}", parts, "qkv")
                )
        else:
            entries.append(Entry(TE2_PREFIX + rename(k), (k,), "copy"))
    return ComponentMap("text encoder 2", entries)


# ---------------------------------------------------------------- LoRA (kohya) names

LORA_PREFIXES = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}


def lora_name(component: str, module_path: str, unet_names: UNetNames | None = None) -> str:
    """kohya's name for an adapted module: `lora_unet_<LDM path>` for the UNet and
    `lora_te{1,2}_<text_model path>` for the text encoders, dots turned into underscores."""
    if component == "unet":
        if unet_names is None:
            raise ValueError("UNet LoRA names need the UNet's config")
        path = unet_names.module_to_ldm(module_path)
    else:
        path = hf_text_path(module_path)
    return LORA_PREFIXES[component] + path.replace(".", "_")
