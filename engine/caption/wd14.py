"""The WD14 tagger family (SmilingWolf's wd-*-tagger models) run with onnxruntime, as kohya's
finetune/tag_images_by_wd14_tagger.py runs them with --onnx.

The layout: model.onnx takes NHWC float32 pixels in 0..255, BGR, of one square size (448 for the
WD14 models; read from the model here rather than assumed) and outputs one sigmoid probability per
row of selected_tags.csv (tag_id,name,category,count; category 9 rating, 0 general, 4 character).

What we do as kohya does: the image is padded to a square with white (centred, the odd pixel to the
right/bottom), then resized; a tag is kept when its probability is >= its category's threshold
(the character threshold defaults to the general one); tags come in the CSV's order (general, then
character); the rating is the most likely rating row, and is left out unless asked for; with
underscores turned into spaces (kohya's --remove_underscore, always on here) except in tags of
three characters or fewer, which are the kaomoji (^_^, o_o, >_<).
Where we differ: the resize is Pillow's bicubic (the WD14 reference's), not cv2's; categories other
than 4 and 9 (taggers with artist or meta rows) are thresholded as general tags instead of being
misaligned with the model's outputs.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from loradrop.errors import UserError

from .spec import TaggerSpec, first_line

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATING, GENERAL, CHARACTER = 9, 0, 4
DEFAULT_SIZE = 448  # kohya's IMAGE_SIZE, for a model whose height and width are dynamic
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Tag:
    raw: str  # as in the CSV, underscores and all
    name: str  # as written to captions
    category: int


def tagger_files(path: Path) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) for a tagger folder or its .onnx file."""
    onnx = path if path.suffix == ".onnx" else path / MODEL_FILE
    tags = onnx.parent / TAGS_FILE
    if not onnx.is_file():
        raise UserError(
            f"{onnx} does not exist; give --model a WD14 tagger folder holding {MODEL_FILE} and {TAGS_FILE}."
        )
    if not tags.is_file():
        raise UserError(
            f"{onnx.parent} has {onnx.name} but no {TAGS_FILE}; put the tags list that came with the model beside it."
        )
    return onnx, tags


def caption_name(raw: str) -> str:
    """kohya's --remove_underscore: short tags (kaomoji) keep their underscores."""
    return raw.replace("_", " ") if len(raw) > 3 else raw


def read_tags(path: Path) -> list[Tag]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path} cannot be read ({e}); use the {TAGS_FILE} that came with the tagger."
        ) from None
    header = [h.strip() for h in rows[0]] if rows else []
    if "name" not in header or "category" not in header:
        raise UserError(
            f"{path} is not a WD14 tags list: its header is {','.join(header) or 'empty'}, expected tag_id,name,category,count."
        )
    name_at, category_at = header.index("name"), header.index("category")
    tags = []
    for line, row in enumerate(rows[1:], start=2):
        try:
            tags.append(Tag(row[name_at], caption_name(row[name_at]), int(row[category_at])))
        except (IndexError, ValueError):
            raise UserError(
                f"{path} line {line} has no tag name and integer category; use the {TAGS_FILE} that came with the tagger."
            ) from None
    return tags


def select_tags(probs: np.ndarray, tags: list[Tag], spec: TaggerSpec) -> list[str]:
    """The caption's tags for one image's probabilities, in the CSV's order (rating first if kept)."""
    excluded = {t.strip() for t in spec.exclude_tags if t.strip()}
    general, character = (
        spec.threshold,
        spec.character_threshold if spec.character_threshold is not None else spec.threshold,
    )
    chosen, ratings = [], []
    for tag, p in zip(tags, probs.tolist()):
        if tag.category == RATING:
            ratings.append((p, tag))
        elif p >= (character if tag.category == CHARACTER else general) and not _excluded(tag, excluded):
            chosen.append(tag.name)
    if spec.keep_rating and ratings:
        best = max(ratings, key=lambda pt: pt[0])[1]  # first of equals, as numpy's argmax
        if not _excluded(best, excluded):
            chosen.insert(0, best.name)
    return chosen


def _excluded(tag: Tag, excluded: set[str]) -> bool:
    return tag.name in excluded or tag.raw in excluded


def preprocess(image: Image.Image, size: int, bgr: bool) -> np.ndarray:
    """An RGB image as the model's input row: white-padded square, resized, HWC float32 0..255.

    Resized first and padded after, which is kohya's pad-then-resize but for the one blended
    line where the image meets the padding, and does not spend time resizing white."""
    width, height = image.size
    side = max(width, height)
    if side != size:
        width, height = max(1, round(width * size / side)), max(1, round(height * size / side))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    square = Image.new("RGB", (size, size), _WHITE)
    square.paste(image.convert("RGB"), ((size - width) // 2, (size - height) // 2))
    pixels = np.asarray(square, dtype=np.float32)
    return pixels[:, :, ::-1] if bgr else pixels


class WD14Tagger:
    """A loaded tagger (see the module's docstring); `caption` returns comma-joined tags."""

    def __init__(self, spec: TaggerSpec):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(
                "The WD14 tagger needs onnxruntime; install it with: pip install 'loradrop[caption]' (or onnxruntime-gpu for a GPU)."
            ) from None
        self.spec = spec
        onnx, tags_path = tagger_files(spec.model)
        self.tags = read_tags(tags_path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are about graph optimisations
        providers = _providers(ort.get_available_providers(), spec.device)
        try:
            self.session = ort.InferenceSession(str(onnx), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise UserError(
                f"{onnx} cannot be loaded by onnxruntime ({first_line(e)}); give --model a WD14 tagger's model.onnx."
            ) from None
        model_input, model_output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name = model_input.name
        self.size, self.fixed_batch = _input_layout(onnx, model_input.shape)
        self.dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        self.batch_size = self.fixed_batch or max(1, spec.batch_size)
        outputs = model_output.shape[-1] if model_output.shape else None
        if isinstance(outputs, int):
            self._check_outputs(outputs, onnx, tags_path)
        self.onnx, self.tags_path = onnx, tags_path
        provider = self.session.get_providers()[0].removesuffix("ExecutionProvider")
        self.description = f"WD14 tagger {spec.model} ({provider})"
        self.empty_hint = "no tag reached the threshold; lower --threshold"

    def _check_outputs(self, outputs: int, onnx: Path, tags_path: Path) -> None:
        if outputs != len(self.tags):
            raise UserError(
                f"{tags_path} lists {len(self.tags)} tags but {onnx} outputs {outputs} scores per image; use the {TAGS_FILE} that came with this model."
            )

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([preprocess(im, self.size, self.spec.bgr) for im in images]).astype(
            self.dtype, copy=False
        )
        if self.fixed_batch and len(images) < self.fixed_batch:
            # A model exported with a fixed batch takes only full batches: pad with white rows.
            batch = np.concatenate(
                [batch, np.full((self.fixed_batch - len(images), *batch.shape[1:]), 255, self.dtype)]
            )
        probs = self.session.run(None, {self.input_name: batch})[0][: len(images)]
        self._check_outputs(probs.shape[-1], self.onnx, self.tags_path)
        return probs.astype(np.float32, copy=False)

    def caption(self, images: list[Image.Image]) -> list[str]:
        return [", ".join(select_tags(p, self.tags, self.spec)) for p in self.probabilities(images)]


def _providers(available: list[str], device: str | None) -> list[str]:
    cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not cuda:
        raise UserError(
            "onnxruntime here has no CUDA provider; install onnxruntime-gpu in place of onnxruntime, or caption with --device cpu."
        )
    return (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if cuda and device != "cpu"
        else ["CPUExecutionProvider"]
    )


def _input_layout(onnx: Path, shape: list) -> tuple[int, int | None]:
    """(square size, fixed batch or None) from the model's NHWC input shape."""
    if len(shape) != 4 or shape[3] != 3:
        raise UserError(
            f"{onnx} takes input of shape {shape}, not a WD14 tagger's (batch, size, size, 3); give --model a WD14 tagger."
        )
    height, width = shape[1], shape[2]
    if isinstance(height, int) and isinstance(width, int) and height != width:
        raise UserError(
            f"{onnx} takes {width}x{height} images, not square ones as a WD14 tagger does; give --model a WD14 tagger."
        )
    size = height if isinstance(height, int) and height > 0 else DEFAULT_SIZE
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return size, batch
