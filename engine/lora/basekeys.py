"""Which base checkpoint tensor each kohya LoRA module adapts, read one at a time.

A single-file SDXL checkpoint stores the UNet under LDM names, so `lora_unet_X` adapts
`model.diffusion_model.X.weight` (dots as underscores). Text encoder 1 keeps Hugging Face names
(`lora_te1_text_model_…`). Text encoder 2 is OpenCLIP: kohya names its modules by their Hugging
Face paths, and keymap's te2_map joins those to the OpenCLIP tensors, including the fused
`attn.in_proj_weight` that holds q, k and v as three row blocks in that order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from ..models import keymap
from ..tensorfile import TensorFile

_WEIGHT = ".weight"
_TE2_LAYERS = keymap.TE2_PREFIX + "transformer.resblocks."
# The Linear modules of one CLIP encoder layer, by their Hugging Face names: what kohya adapts.
_CLIP_LAYER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


def frobenius(tensor: torch.Tensor, chunk: int = 1 << 18) -> float:
    """‖W‖_F in fp32, an L2-sized chunk (1 MB of fp32) at a time.

    Converting a whole fp16 weight to fp32 first costs more than the sum itself (fresh memory,
    page faults), and torch's own fp32 norm of a large tensor drifts by up to 1e-3 on one thread;
    BLAS dot products over 256 Ki-element chunks summed in double stay within 1e-6.
    """
    flat = tensor.reshape(-1)
    if not flat.is_floating_point() or flat.device.type != "cpu":
        return float(torch.linalg.vector_norm(flat, dtype=torch.float64))
    buffer = torch.empty(min(chunk, flat.numel()), dtype=torch.float32)
    total = 0.0
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        b = buffer[: part.numel()]
        b.copy_(part)
        total += float(torch.dot(b, b))
    return total**0.5


@dataclass(frozen=True)
class BaseTensor:
    key: str  # the checkpoint tensor
    chunk: int | None  # q/k/v row block of TE2's fused projection, else None
    shape: tuple[int, ...]  # the adapted weight's shape (one row block for a chunk)
    offset: int  # where the tensor starts in the file: reading in this order is sequential


class BaseIndex:
    """LoRA module names → base weights of an open SGM checkpoint."""

    def __init__(self, tf: TensorFile):
        self.tf = tf
        self.by_lora: dict[str, BaseTensor] = {}
        self._fused: tuple[str, torch.Tensor] | None = None
        unet_prefix = keymap.LORA_PREFIXES["unet"]
        for key, info in tf.infos.items():
            if not key.endswith(_WEIGHT) or len(info.shape) < 2:
                continue
            if key.startswith(keymap.UNET_PREFIX):
                path = key[len(keymap.UNET_PREFIX) : -len(_WEIGHT)]
                self._add(unet_prefix + path.replace(".", "_"), key, None)
            elif key.startswith(keymap.TE1_PREFIX):
                self._add(keymap.lora_name("te1", key[len(keymap.TE1_PREFIX) : -len(_WEIGHT)]), key, None)
        self._index_te2()

    def _index_te2(self) -> None:
        layers = sorted(
            {int(k[len(_TE2_LAYERS) :].split(".")[0]) for k in self.tf.infos if k.startswith(_TE2_LAYERS)}
        )
        names = [f"text_model.encoder.layers.{i}.{m}{_WEIGHT}" for i in layers for m in _CLIP_LAYER_LINEARS]
        for entry in keymap.te2_map(names).entries:
            if entry.sgm not in self.tf.infos:
                continue
            for i, hf in enumerate(entry.diffusers):
                self._add(
                    keymap.lora_name("te2", hf[: -len(_WEIGHT)]), entry.sgm, i if entry.op == "qkv" else None
                )

    def _add(self, name: str, key: str, chunk: int | None) -> None:
        info = self.tf.infos[key]
        shape = info.shape if chunk is None else (info.shape[0] // 3, *info.shape[1:])
        self.by_lora[name] = BaseTensor(key, chunk, tuple(shape), info.start)

    def __contains__(self, name: str) -> bool:
        return name in self.by_lora

    def __getitem__(self, name: str) -> BaseTensor:
        return self.by_lora[name]

    @contextlib.contextmanager
    def mapped(self, name: str) -> Iterator[torch.Tensor]:
        """The base weight a module adapts as a read-only view of the file (no copy), valid inside
        the block; for measuring norms without allocating the weight."""
        entry = self.by_lora[name]
        with self.tf.mapped(entry.key) as weight:
            yield weight if entry.chunk is None else weight.chunk(3, dim=0)[entry.chunk]

    def read(self, name: str) -> torch.Tensor:
        """The base weight a module adapts, in the checkpoint's dtype.

        A fused q/k/v tensor is kept after its first read, so the three modules cost one read.
        """
        entry = self.by_lora[name]
        if entry.chunk is None:
            return self.tf.read(entry.key)
        if self._fused is None or self._fused[0] != entry.key:
            self._fused = (entry.key, self.tf.read(entry.key))
        return self._fused[1].chunk(3, dim=0)[entry.chunk]
