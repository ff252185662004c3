"""Caption a dataset folder: pick the images to caption, run the captioner in batches, write each
same-stem caption file atomically, and report every image's outcome.

An image that cannot be read, or that the captioner fails on, is reported with a one-sentence
reason and the others are still captioned (a failing batch is retried image by image to find the
culprit). A problem with the model itself (UserError) stops the run.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from loradrop.errors import UserError
from loradrop.fsutil import atomic_write_text

from ..data.images import IMAGE_EXTENSIONS, BadImage, load_rgb
from .spec import (
    Captioner,
    CaptionerSpec,
    CaptionResult,
    Existing,
    ImageResult,
    Outcome,
    TaggerSpec,
    VlmSpec,
    first_line,
)

Progress = Callable[[int, int], None]  # (images done, images to caption)
_NAMED = 5  # images named one by one in the already-captioned error


def load_captioner(spec: CaptionerSpec) -> Captioner:
    """Load the model (seconds to minutes for a big VLM); reuse the result for many folders."""
    if isinstance(spec, TaggerSpec):
        from .wd14 import WD14Tagger

        return WD14Tagger(spec)
    from .vlm import VlmCaptioner

    return VlmCaptioner(spec)


def detect_kind(path: Path) -> type[TaggerSpec | VlmSpec]:
    """Which captioner a model path holds: an ONNX tagger, or a transformers folder."""
    from .wd14 import MODEL_FILE

    if path.suffix == ".onnx" or (path / MODEL_FILE).exists():
        return TaggerSpec
    if (path / "config.json").exists():
        return VlmSpec
    what = "does not exist" if not path.exists() else "holds neither model.onnx nor config.json"
    raise UserError(
        f"Caption model {path} {what}; give --model a WD14 tagger folder (model.onnx, selected_tags.csv) or a transformers model folder (config.json)."
    )


def list_images(folder: Path) -> list[Path]:
    """The images a dataset scan would see: the folder's own, not hidden ones or its subfolders'."""
    try:
        return sorted(
            p
            for p in folder.iterdir()
            if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
    except OSError as e:
        raise UserError(f"{folder} cannot be listed ({e.strerror or e}); check its permissions.") from None


def caption_path(image: Path, extension: str = ".txt") -> Path:
    """The same-stem caption file, named as the dataset scan looks for it."""
    return image.with_name(image.stem + extension)


def with_trigger(caption: str, trigger: str | None) -> str:
    """The trigger word first: moved there if the caption has it as a comma-separated part."""
    trigger = (trigger or "").strip()
    if not trigger:
        return caption
    parts = [p.strip() for p in caption.split(",")]
    if trigger in parts:
        return ", ".join([trigger, *(p for p in parts if p and p != trigger)])
    return f"{trigger}, {caption}" if caption else trigger


def caption_folder(
    folder: str | os.PathLike,
    captioner: CaptionerSpec | Captioner,
    *,
    trigger: str | None = None,
    existing: Existing = Existing.REFUSE,
    dry_run: bool = False,
    caption_extension: str = ".txt",
    progress: Progress | None = None,
) -> CaptionResult:
    """Caption the images of `folder`. A spec is loaded here, after the folder checks (so a bad
    folder fails at once); a loaded Captioner is used as is."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{folder} {what}; give a folder of images to caption.")
    images = list_images(folder)
    if not images:
        raise UserError(f"{folder} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) to caption.")
    todo, settled = _plan(folder, images, existing, caption_extension)
    if todo and isinstance(captioner, (TaggerSpec, VlmSpec)):
        captioner = load_captioner(captioner)
    description = (
        str(captioner.model) if isinstance(captioner, (TaggerSpec, VlmSpec)) else captioner.description
    )
    start = time.perf_counter()  # the rate counts captioning, not loading the model
    results = list(settled)
    if progress:
        progress(0, len(todo))
    step = max(1, captioner.batch_size)
    batches = [todo[i : i + step] for i in range(0, len(todo), step)]
    done = 0
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        # Decode one batch ahead, so reading images overlaps the model's work on the last batch.
        ahead = [pool.submit(_load, p) for p in batches[0]] if batches else []
        for i, batch in enumerate(batches):
            loaded = [f.result() for f in ahead]
            ahead = [pool.submit(_load, p) for p in batches[i + 1]] if i + 1 < len(batches) else []
            results += _caption_batch(captioner, batch, loaded, trigger, dry_run, caption_extension)
            done += len(batch)
            if progress:
                progress(done, len(todo))
    results.sort(key=lambda r: r.image.name)
    return CaptionResult(folder, description, tuple(results), time.perf_counter() - start)


def _plan(
    folder: Path, images: list[Path], existing: Existing, extension: str
) -> tuple[list[Path], list[ImageResult]]:
    """(images to caption, results for the others: kept, or failed because they share a caption file)."""
    sharing = defaultdict(list)
    for p in images:
        sharing[caption_path(p, extension)].append(p)
    clashes = [
        ImageResult(
            p,
            target,
            Outcome.FAILED,
            reason=f"{' and '.join(q.name for q in group)} share the caption file {target.name}; rename all but one.",
        )
        for target, group in sharing.items()
        if len(group) > 1
        for p in group
    ]
    images = [p for p in images if len(sharing[caption_path(p, extension)]) == 1]
    have = [p for p in images if caption_path(p, extension).exists()]
    if have and existing is Existing.REFUSE:
        named = ", ".join(caption_path(p, extension).name for p in have[:_NAMED]) + (
            f" and {len(have) - _NAMED} more" if len(have) > _NAMED else ""
        )
        raise UserError(
            f"{len(have)} of {len(images)} images in {folder} already have captions ({named}); "
            "pass --overwrite to replace them or --missing-only to caption only the others."
        )
    if existing is Existing.OVERWRITE:
        return images, clashes
    have_set = set(have)
    kept = [ImageResult(p, caption_path(p, extension), Outcome.KEPT) for p in have]
    return [p for p in images if p not in have_set], clashes + kept


def _load(path: Path) -> Image.Image | str:
    try:
        return load_rgb(path)
    except BadImage as e:
        return f"{path.name} cannot be read ({e.reason}); replace or remove it."


def _caption_batch(
    captioner: Captioner, paths: list[Path], loaded: list, trigger: str | None, dry_run: bool, extension: str
) -> list[ImageResult]:
    readable = [(p, im) for p, im in zip(paths, loaded) if isinstance(im, Image.Image)]
    captions = dict(zip((p for p, _ in readable), _caption_each(captioner, [im for _, im in readable])))
    results = []
    for path, image in zip(paths, loaded):
        target = caption_path(path, extension)
        if isinstance(image, str):
            results.append(ImageResult(path, target, Outcome.FAILED, reason=image))
            continue
        caption = captions[path]
        if isinstance(caption, BaseException):
            results.append(
                ImageResult(
                    path,
                    target,
                    Outcome.FAILED,
                    reason=f"{path.name} could not be captioned ({first_line(caption)}).",
                )
            )
        elif not caption.strip():
            results.append(
                ImageResult(
                    path,
                    target,
                    Outcome.FAILED,
                    reason=f"{path.name} got an empty caption: {captioner.empty_hint}.",
                )
            )
        else:
            results.append(_write(path, target, with_trigger(caption.strip(), trigger), dry_run))
    return results


def _write(path: Path, target: Path, caption: str, dry_run: bool) -> ImageResult:
    if dry_run:
        return ImageResult(path, target, Outcome.WOULD_WRITE, caption)
    try:
        atomic_write_text(target, caption + "\n")  # one line and a newline, as kohya's tagger writes
    except OSError as e:
        return ImageResult(
            path,
            target,
            Outcome.FAILED,
            reason=f"{target} cannot be written ({e.strerror or e}); check the folder's permissions and free space.",
        )
    return ImageResult(path, target, Outcome.WRITTEN, caption)


def _caption_each(captioner: Captioner, images: list[Image.Image]) -> list[str | BaseException]:
    """The captions of a batch; if the batch fails, each image alone, so one bad image fails alone."""
    if not images:
        return []
    try:
        captions = captioner.caption(images)
    except UserError:
        raise
    except Exception as e:
        if len(images) == 1:
            return [e]
        return [c for image in images for c in _caption_each(captioner, [image])]
    if len(captions) != len(images):
        raise UserError(
            f"The captioner {captioner.description} returned {len(captions)} captions for {len(images)} images; it cannot be used as is."
        )
    return list(captions)
