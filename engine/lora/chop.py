"""Keep, drop or weight a LoRA's UNet blocks: chop_blocks, with linear fractional weights.

The vector is entry 0 (a global factor g for the UNet blocks) then one weight v_b per block of
the file's layout; block b gets w_b = g · v_b. With |w_b| < 1e-6 the block's keys are removed,
with w_b = 1 they are copied untouched; the text encoders and any non-block key always pass
through. For other weights chop_blocks multiplies alpha, down and up by w_b, which scales ΔW by
w_b³; here one factor is scaled (a LoCon's up, a LoHa's hada_w1_a, a LoKr's first Kronecker
half), so ΔW scales by w_b, as a block weight means in the Block Weight loader. A DoRA's change
is not linear in its tensors, so its blocks take only 0 or 1.

Every LoCon module kept is written with the file's most common alpha, its own alpha / rank folded
into lora_up (the same ΔW), so diffusers gives each module its strength (see lorafile). A file
that has one alpha already (trained ones do when conv_alpha = network_alpha) keeps its tensors bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loradrop.errors import UserError

from ..outputs import CHOP_SUFFIX
from ..tensorfile import TensorFile
from ..train.metadata import derived, derived_name
from .blocks import Layout, check_length, format_weight, is_plain_numbers, layout, module_of, parse_vector
from .lorafile import ALPHA, check_keys, common_alpha, kind_of, network_dims, save_lora, weighed, with_alpha

SUFFIX = CHOP_SUFFIX  # "-chop", as chop_blocks names its output


@dataclass
class ChopResult:
    path: Path
    layout: Layout
    vector: list[float]  # as parsed: entry 0 then one weight per block
    weights: list[float]  # per block, entry 0 applied
    removed: int  # tensors removed

    def lines(self) -> list[str]:
        return self.layout.lines(self.weights)


def chop(
    lora: str | os.PathLike, vector: str, out: str | os.PathLike | None = None, *, seed: int = 0
) -> ChopResult:
    """Write the chopped LoRA to `out` (default `<stem>-chop.safetensors` beside the input)."""
    source = Path(lora).expanduser()
    with TensorFile(source, what="a LoRA (.safetensors)") as tf:
        groups = check_keys(tf.keys(), source)
        lay = layout(tf.keys())
        values = parse_vector(vector, len(lay.blocks), seed=seed)
        check_length(values, lay, source)
        weights = [values[0] * v for v in values[1:]]
        kept = {k: w for block, w in zip(lay.blocks, weights) if abs(w) >= 1e-6 for k in block.keys}
        # Only what is kept is read: a chop to a few blocks reads a small part of the file.
        tensors = tf.read_all(keys=[*lay.passthrough, *kept])
        metadata = dict(tf.metadata)
    removed = sum(len(block.keys) for block in lay.blocks) - len(kept)
    weights_of = {module_of(k): w for k, w in kept.items()}
    stored = [t for k, t in tensors.items() if k.endswith(ALPHA)]
    alpha = common_alpha((float(t.float()) for t in stored), stored[0].dtype if stored else torch.float16)
    for name in sorted({module_of(k) for k in tensors}):
        w = weights_of.get(name, 1.0)
        w = 1.0 if abs(w - 1.0) <= 1e-6 else w
        kind = kind_of(groups[name])
        if "dora_scale" in groups[name] and w != 1.0:
            raise UserError(
                f"{source} module {name} is a DoRA, whose change is not linear in its tensors, so its block cannot weigh {w:g}; "
                f"give that block 0 or 1, or chop the resized file (resize writes a plain LoCon)."
            )
        if kind == "locon":
            tensors.update(with_alpha(tensors, name, alpha, w))
        elif w != 1.0:
            tensors.update(weighed(tensors, name, kind, w))
    path = (
        Path(out).expanduser() if out is not None else source.with_name(f"{source.stem}{SUFFIX}.safetensors")
    )
    # A file named by the user is called by its own name; otherwise the source's name + "-chop".
    metadata = derived(metadata, path.stem if out is not None else derived_name(source, SUFFIX))
    # As chop_blocks: the vector as given; a preset or tokens are recorded as the numbers used.
    metadata["block_vector_string"] = (
        vector.strip() if is_plain_numbers(vector) else ",".join(map(format_weight, values))
    )
    metadata["ss_network_alpha"] = network_dims(tensors)[1]
    save_lora(path, tensors, metadata)
    return ChopResult(path, lay, values, weights, removed)
