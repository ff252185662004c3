"""SDXL's conditioning: the two text encoders' context and pooled embedding, and size ids."""

from __future__ import annotations

from typing import Sequence

import torch

from ..models.sdxl import SDXL

MAX_LENGTH = 77  # 75 usable tokens between the start and end tokens


def tokenize(model: SDXL, captions: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    tok1, tok2 = model.tokenizers
    kw = dict(padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    return tok1(list(captions), **kw).input_ids.to(device), tok2(list(captions), **kw).input_ids.to(device)


def encode_text(model: SDXL, ids1: torch.Tensor, ids2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Context [B, 77, d1+d2] and pooled [B, proj].

    TE1: the hidden state after layer 11 of 12 (no final LayerNorm); TE2: its penultimate hidden
    state. Pooled: TE2's final-LayerNorm state at the first end token, through text_projection.
    TE1's last layer is never used, so its adapters get no gradient (as in kohya's SDXL trainer).
    """
    h1 = model.te1(ids1, output_hidden_states=True).hidden_states[-2]
    out2 = model.te2(ids2, output_hidden_states=True)
    context = torch.cat([h1, out2.hidden_states[-2].to(h1.dtype)], dim=-1)
    return context, out2.text_embeds


def size_ids(original_hw, crop_top_left, target_hw, device, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning, one row per sample: original (h, w), crop (top, left), target
    (h, w). The UNet embeds each number with a 256-dim sinusoid and appends them to the pooled
    text embedding (1280 + 6·256 = 2816 at full size)."""
    rows = [[*o, *c, *t] for o, c, t in zip(original_hw, crop_top_left, target_hw)]
    return torch.tensor(rows, device=device, dtype=dtype)
