"""Keep, drop or weight a LoRA's UNet blocks: chop_blocks, with linear fractional weights.

The vector is entry 0 (a global factor g for the UNet blocks) then one weight v_b per block of
the file's layout; block b gets w_b = g · v_b. With |w_b| < 1e-6 the block's keys are removed,
with w_b = 1 they are copied untouched; the text encoders and any non-block key always pass
through. For other weights chop_blocks multiplies alpha, down and up by w_b, which scales ΔW by
w_b³; here only the up factor is scaled, so ΔW scales by w_b, as a block weight means in the
Block Weight loader.

Every module kept is written with the file's most common alpha, its own alpha / rank folded
into lora_up (the same ΔW), so diffusers gives each module its strength (see lorafile). A file
that has one alpha already (trained ones do when conv_alpha = network_alpha) keeps its tensors bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tensorfile import TensorFile
from ..train.metadata import derived, derived_name
from .blocks import Layout, check_length, format_weight, is_plain_numbers, layout, parse_vector
from .lorafile import ALPHA, DOWN, check_keys, common_alpha, network_dims, save_lora, with_alpha

SUFFIX = "-chop"


@dataclass
class ChopResult:
    path: Path
    layout: Layout
    vector: list[float]  # as parsed: entry 0 then one weight per block
    weights: list[float]  # per block, entry 0 applied
    removed: int  # tensors removed

    def lines(self) -> list[str]:
        return self.layout.lines(self.weights)


def chop(lora: str | os.PathLike, vector: str, out: str | os.PathLike | None = None, *, seed: int = 0) -> ChopResult:
    """Write the chopped LoRA to `out` (default `<stem>-chop.safetensors` beside the input)."""
    source = Path(lora).expanduser()
    with TensorFile(source, what="a LoRA (.safetensors)") as tf:
        check_keys(tf.keys(), source)
        lay = layout(tf.keys())
        values = parse_vector(vector, len(lay.blocks), seed=seed)
        check_length(values, lay, source)
        weights = [values[0] * v for v in values[1:]]
        kept = {k: w for block, w in zip(lay.blocks, weights) if abs(w) >= 1e-6 for k in block.keys}
        # Only what is kept is read: a chop to a few blocks reads a small part of the file.
        tensors = tf.read_all(keys=[*lay.passthrough, *kept])
        metadata = dict(tf.metadata)
    removed = sum(len(block.keys) for block in lay.blocks) - len(kept)
    modules = [k[: -len(DOWN)] for k in tensors if k.endswith(DOWN)]
    stored = [t for k, t in tensors.items() if k.endswith(ALPHA)]
    alpha = common_alpha((float(t.float()) for t in stored), stored[0].dtype if stored else torch.float16)
    for name in modules:
        w = kept.get(name + DOWN, 1.0)
        tensors.update(with_alpha(tensors, name, alpha, 1.0 if abs(w - 1.0) <= 1e-6 else w))
    path = Path(out).expanduser() if out is not None else source.with_name(f"{source.stem}{SUFFIX}.safetensors")
    # A file named by the user is called by its own name; otherwise the source's name + "-chop".
    metadata = derived(metadata, path.stem if out is not None else derived_name(source, SUFFIX))
    # As chop_blocks: the vector as given; a preset or tokens are recorded as the numbers used.
    metadata["block_vector_string"] = vector.strip() if is_plain_numbers(vector) else ",".join(map(format_weight, values))
    metadata["ss_network_alpha"] = network_dims(tensors)[1]
    save_lora(path, tensors, metadata)
    return ChopResult(path, lay, values, weights, removed)
