"""The captioning contract: what to run (a captioner spec), on which files (a write policy), and
what came of each image. The CLI builds these from its flags; the daemon's caption stage
(daemon/caption_stage.py) from `loradrop.toml` and its own settings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

DEFAULT_THRESHOLD = 0.35  # kohya's --thresh
DEFAULT_VLM_PROMPT = "Write a one-sentence caption for this image."


@dataclass(frozen=True)
class TaggerSpec:
    """A WD14-family tagger: a folder with model.onnx and selected_tags.csv (or the .onnx file)."""

    model: Path
    threshold: float = DEFAULT_THRESHOLD  # general tags (category 0, and any other but 4 and 9)
    character_threshold: float | None = None  # category 4; None: the general threshold, as kohya
    exclude_tags: tuple[str, ...] = ()  # matched with or without underscores
    keep_rating: bool = False  # the most likely rating tag first, as kohya's --use_rating_tags
    bgr: bool = True  # the WD14 models take BGR; other taggers in the same layout may take RGB
    batch_size: int = 4  # used when the model's batch dimension is dynamic
    device: str | None = None  # "cpu" or "cuda"; None: CUDA when onnxruntime has its provider


@dataclass(frozen=True)
class VlmSpec:
    """A transformers vision-language model saved in a local folder (save_pretrained layout)."""

    model: Path
    # Wrapped in the model's chat template when its processor has one (LLaVA, Qwen-VL); passed as
    # is otherwise (BLIP takes a caption prefix or nothing, Florence-2 a task token such as
    # "<MORE_DETAILED_CAPTION>"). None: DEFAULT_VLM_PROMPT for chat models, nothing for the others.
    prompt: str | None = None
    max_length: int = 77  # new tokens per caption
    batch_size: int = 4
    device: str | None = None  # "cpu" or "cuda"; None: CUDA when torch sees a GPU (bf16 there)


CaptionerSpec = TaggerSpec | VlmSpec


class Captioner(Protocol):
    """A loaded captioner: load once, caption many folders (the daemon keeps one between jobs)."""

    description: str  # for logs and reports, e.g. "WD14 tagger /models/wd-vit-v3 (CPU)"
    batch_size: int
    empty_hint: str  # why a caption can come out empty and what to do, for the image's reason

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order; raises for a batch it cannot process."""
        ...


class Existing(enum.Enum):
    """What to do about images that already have a caption file."""

    REFUSE = "refuse"  # fail before loading the model, naming them (the CLI's default)
    OVERWRITE = "overwrite"
    KEEP = "keep"  # caption only the images without one (--missing-only, the daemon's stage)


class Outcome(enum.Enum):
    WRITTEN = "written"
    WOULD_WRITE = "would write"  # a dry run
    KEPT = "kept"  # it had a caption already, left alone
    FAILED = "failed"


@dataclass(frozen=True)
class ImageResult:
    image: Path
    caption_file: Path
    outcome: Outcome
    caption: str | None = None  # the caption written (or that would be), None when kept or failed
    reason: str | None = None  # one sentence, for FAILED


@dataclass(frozen=True)
class CaptionResult:
    folder: Path
    captioner: str  # Captioner.description
    images: tuple[ImageResult, ...] = field(default_factory=tuple)
    seconds: float = 0.0

    def with_outcome(self, outcome: Outcome) -> list[ImageResult]:
        return [r for r in self.images if r.outcome is outcome]

    @property
    def failed(self) -> list[ImageResult]:
        return self.with_outcome(Outcome.FAILED)

    def summary(self) -> str:
        """One line: how many images got which outcome, and how fast."""
        counts = [f"{len(self.with_outcome(o))} {o.value}" for o in Outcome if self.with_outcome(o)]
        done = len(self.with_outcome(Outcome.WRITTEN)) + len(self.with_outcome(Outcome.WOULD_WRITE))
        rate = f", {done / self.seconds:.1f} images/s" if done and self.seconds > 0 else ""
        return f"{self.folder}: {', '.join(counts) or 'no images'} ({self.captioner}, {self.seconds:.1f} s{rate})."


def first_line(e: BaseException) -> str:
    """An exception's first line, short enough to sit inside a one-sentence reason."""
    lines = str(e).strip().splitlines()
    return (lines[0].strip().rstrip(".") if lines else type(e).__name__)[:200]
