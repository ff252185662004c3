"""Captions for a dataset folder from local models: WD14 taggers (onnxruntime) and transformers
vision-language models. `caption_folder` is the one entry point (the CLI's and the
daemon's caption stage); see docs/captions.md."""

from .run import caption_folder, caption_path, detect_kind, list_images, load_captioner, with_trigger
from .spec import Captioner, CaptionerSpec, CaptionResult, Existing, ImageResult, Outcome, TaggerSpec, VlmSpec

__all__ = [
    "Captioner",
    "CaptionerSpec",
    "CaptionResult",
    "Existing",
    "ImageResult",
    "Outcome",
    "TaggerSpec",
    "VlmSpec",
    "caption_folder",
    "caption_path",
    "detect_kind",
    "list_images",
    "load_captioner",
    "with_trigger",
]
