"""Tiny captioners built on the spot, in the layouts real ones ship in, for the tests and the bench
(nothing can be downloaded): a WD14-layout tagger whose scores are known in advance, and randomly
initialised vision-language models saved with their processors.

The tiny tagger's graph: the input's per-channel means (0..1, in the order the pixels are fed)
times a weight matrix, plus a bias, through a sigmoid. Most tags have zero weights, so their
probability is sigmoid(bias) whatever the image; two read the pixels: "blue_theme" (the first
channel, blue when fed BGR) and "white_background" (all three), so a test can see the channel
order and the white padding.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .wd14 import CHARACTER, GENERAL, MODEL_FILE, RATING, TAGS_FILE


@dataclass(frozen=True)
class TinyTag:
    name: str
    category: int
    bias: float  # the logit for a black image
    weights: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per input channel mean, 0..1


# Probabilities for a pure-blue square, fed BGR: in brackets. The general and character thresholds
# of 0.35 keep 1girl, solo, ^_^, blue_theme, hatsune_miku and kagamine_rin; a character threshold
# of 0.85 drops hatsune_miku. A red image twice as tall as wide is padded to half white: it gets
# white_background instead of blue_theme.
TINY_TAGS = (
    TinyTag("general", RATING, 0.0),  # (0.50)
    TinyTag("sensitive", RATING, 1.0),  # (0.73) the most likely rating
    TinyTag("questionable", RATING, -1.0),
    TinyTag("explicit", RATING, -2.0),
    TinyTag("1girl", GENERAL, 2.2),  # (0.90)
    TinyTag("solo", GENERAL, 0.0),  # (0.50)
    TinyTag("long_hair", GENERAL, -0.65),  # (0.343) just under 0.35
    TinyTag("^_^", GENERAL, 1.4),  # (0.80) a kaomoji: keeps its underscore
    TinyTag(
        "white_background", GENERAL, -4.3, (2.0, 2.0, 2.0)
    ),  # pure colours: (0.09); half white red: (0.43)
    TinyTag("blue_theme", GENERAL, -4.0, (6.0, 0.0, 0.0)),  # first channel 1: (0.88); 0: (0.02)
    TinyTag("hatsune_miku", CHARACTER, 0.85),  # (0.70)
    TinyTag("kagamine_rin", CHARACTER, 3.0),  # (0.95)
)


def make_tiny_tagger(
    folder: str | Path, *, size: int = 32, batch: int | None = None, tags: tuple[TinyTag, ...] = TINY_TAGS
) -> Path:
    """Write model.onnx (NHWC float input of `size`, `batch` fixed or dynamic; sigmoid
    probabilities out) and selected_tags.csv into `folder`; return the folder."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([t.weights for t in tags], dtype=np.float32).T  # (3, tags)
    bias = np.array([t.bias for t in tags], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input_1:0"], ["means"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["means", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weights"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1 / 255] * 3, dtype=np.float32), "scale"),
        numpy_helper.from_array(weights, "weights"),
        numpy_helper.from_array(bias, "bias"),
    ]
    n = batch or "batch"
    graph = helper.make_graph(
        nodes,
        "tiny_wd14_tagger",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [n, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [n, len(tags)])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="loradrop.tiny"
    )
    model.ir_version = 8  # readable by every onnxruntime the caption extra allows
    onnx.checker.check_model(model)
    onnx.save(model, folder / MODEL_FILE)
    write_tags_csv(folder / TAGS_FILE, tags)
    return folder


def write_tags_csv(path: Path, tags: tuple[TinyTag, ...]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["tag_id", "name", "category", "count"])
        for i, tag in enumerate(tags):
            out.writerow([1000 + i, tag.name, tag.category, 100 - i])


_WORDS = "a an the of on in with and cat dog girl boy tree house sky sea red blue green small large photo drawing sitting standing smiling".split()


def tiny_tokenizer(specials: list[str], bos: str, eos: str, pad: str, unk: str):
    """A word-level tokenizer over a few dozen words, built in memory (no vocabulary files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        t: i
        for i, t in enumerate(
            [
                *specials,
                *_WORDS,
                "USER",
                "ASSISTANT",
                ":",
                ".",
                "this",
                "image",
                "caption",
                "write",
                "one-sentence",
                "for",
            ]
        )
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins the words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk
    )


# A LLaVA-style chat: the image's tokens, the prompt, then the assistant's turn.
_CHAT = (
    "{% for m in messages %}{{ m['role'] | upper }} : {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def make_tiny_vlm(folder: str | Path, family: str = "llava", seed: int = 0) -> Path:
    """Save a randomly initialised vision-language model and its processor to `folder`:
    "llava" (decoder-only, a chat template, CLIP vision tower) or "blip" (no chat template)."""
    import torch

    folder = Path(folder)
    torch.manual_seed(seed)
    model, processor = _tiny_llava() if family == "llava" else _tiny_blip()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _tiny_llava():
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = tiny_tokenizer(["<pad>", "<s>", "</s>", "<unk>", "<image>"], "<s>", "</s>", "<pad>", "<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=_CHAT,
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=16,  # (32 / 8)² patches
    )
    return LlavaForConditionalGeneration(config), processor


def _tiny_blip():
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = tiny_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]"], "[DEC]", "[SEP]", "[PAD]", "[UNK]"
    )
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    config = BlipConfig(
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "encoder_hidden_size": 16,
            "max_position_embeddings": 128,
            "bos_token_id": 4,
            "eos_token_id": 3,
            "sep_token_id": 3,
            "pad_token_id": 0,
        },
        projection_dim=16,
    )
    return BlipForConditionalGeneration(config), processor
