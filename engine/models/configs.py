"""The bundled SDXL component configs and CLIP tokenizers: loading needs no network at all."""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

_DATA = resources.files("loradrop.engine.models") / "data"


def _load_json(*parts: str) -> dict[str, Any]:
    return json.loads(_DATA.joinpath(*parts).read_text(encoding="utf-8"))


@dataclass
class SDXLConfig:
    """One config dict per component, in the format diffusers/transformers read."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    te1: dict[str, Any]
    te2: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: _load_json("sdxl", "scheduler.json"))

    def to_json(self) -> str:
        return json.dumps(
            {"unet": self.unet, "vae": self.vae, "te1": self.te1, "te2": self.te2}, sort_keys=True
        )

    @classmethod
    def from_json(cls, text: str) -> "SDXLConfig":
        d = json.loads(text)
        return cls(unet=d["unet"], vae=d["vae"], te1=d["te1"], te2=d["te2"])


def sdxl_config() -> SDXLConfig:
    """SDXL base 1.0 and its fine-tunes (Pony Diffusion V6 XL, …) at full size."""
    return SDXLConfig(
        unet=_load_json("sdxl", "unet.json"),
        vae=_load_json("sdxl", "vae.json"),
        te1=_load_json("sdxl", "text_encoder.json"),
        te2=_load_json("sdxl", "text_encoder_2.json"),
    )


def tiny_config() -> SDXLConfig:
    """SDXL's exact topology at tiny widths: the same blocks, depths and layer counts.

    Only widths change (channels, heads, hidden sizes); every module SDXL has, the twin has, so
    a LoCon trained on it has the seed's exact key layout and block tensor counts.
    """
    c = copy.deepcopy(sdxl_config())
    # CLIP-L narrower than OpenCLIP-G, as in SDXL (768 < 1280): diffusers' single-file loader
    # tells the two encoders apart by width, and puts equal-width ones in the wrong place.
    te1_hidden, te2_hidden = 32, 48
    c.te1.update(
        hidden_size=te1_hidden,
        intermediate_size=2 * te1_hidden,
        num_attention_heads=2,
        projection_dim=te1_hidden,
    )
    c.te2.update(
        hidden_size=te2_hidden,
        intermediate_size=2 * te2_hidden,
        num_attention_heads=2,
        projection_dim=te2_hidden,
    )
    c.unet.update(
        block_out_channels=[16, 32, 64],
        attention_head_dim=[1, 2, 4],
        norm_num_groups=8,
        cross_attention_dim=te1_hidden + te2_hidden,
        projection_class_embeddings_input_dim=te2_hidden + 6 * c.unet["addition_time_embed_dim"],
        sample_size=32,
    )
    c.vae.update(block_out_channels=[8, 16, 32, 32], norm_num_groups=8, sample_size=256)
    return c


@functools.lru_cache(maxsize=None)
def tokenizers():
    """SDXL's two CLIP tokenizers from the bundled BPE files.

    Both share CLIP's vocabulary; the first pads with the end token, the second (OpenCLIP) with
    id 0, the "!" token, as SDXL's own tokenizer_2 does.
    """
    from transformers import CLIPTokenizer

    vocab = str(_DATA / "tokenizer" / "vocab.json")
    merges = str(_DATA / "tokenizer" / "merges.txt")
    tok1 = CLIPTokenizer(vocab, merges, model_max_length=77)
    tok2 = CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="!")
    return tok1, tok2
