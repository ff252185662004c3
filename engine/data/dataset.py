"""A dataset folder: images with same-stem captions, checked, bucketed, and batched per epoch.

`scan` reads headers only (plus cheap structural checks, see images.check_image), in threads, so a
folder of thousands of images scans in seconds; pixels are decoded once, by the latent cache.
Every image that cannot be used is listed with its reason in `Dataset.skipped`; the scan fails
with one sentence only when nothing usable remains.
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from loradrop.errors import UserError

from ..recipe import Recipe
from .buckets import Size, make_buckets, pick_bucket
from .captions import BadCaption, read_caption
from .images import IMAGE_EXTENSIONS, BadImage, check_image

_LISTED = 20  # skipped files named one by one in the warning; the rest are counted


@dataclass(frozen=True)
class Item:
    path: Path  # the image
    caption: str  # first line of the caption file, unshuffled
    size: Size  # upright (w, h), EXIF orientation applied
    bucket: Size  # (w, h)


@dataclass
class Dataset:
    folder: Path
    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def skipped_warning(self) -> str | None:
        """One warning naming every skipped file (the first few by name) and why, or None."""
        if not self.skipped:
            return None
        named = "; ".join(f"{p.name}: {why}" for p, why in self.skipped[:_LISTED])
        more = len(self.skipped) - _LISTED
        tail = f"; and {more} more ({_reason_counts(self.skipped[_LISTED:])})" if more > 0 else ""
        return (
            f"Skipped {len(self.skipped)} of {len(self.skipped) + len(self.items)} images in "
            f"{self.folder}: {named}{tail}."
        )


def scan(folder: str | os.PathLike, recipe: Recipe) -> Dataset:
    """Find every usable image in `folder` (not its subfolders) and give it a bucket."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{folder} {what}; expected a folder of images with same-stem {recipe.caption_extension} captions.")
    # Only image names are candidates: captions, sample-prompts.txt, loradrop.toml and anything
    # else are not, and hidden files (editors', macOS's ._ twins) never are.
    try:
        candidates = sorted(
            entry for entry in folder.iterdir() if not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS
        )
    except OSError as e:
        raise UserError(f"{folder} cannot be listed ({e.strerror or e}); check its permissions.") from None
    if recipe.enable_bucket:
        buckets = make_buckets(recipe.resolution, recipe.min_bucket_reso, recipe.max_bucket_reso, recipe.bucket_reso_steps)
    else:
        buckets = [(recipe.resolution, recipe.resolution)]
    dataset = Dataset(folder)
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        checked = pool.map(lambda p: _check(p, recipe.caption_extension), candidates)
        for path, result in zip(candidates, checked):
            if isinstance(result, str):
                dataset.skipped.append((path, result))
            else:
                caption, size = result
                dataset.items.append(Item(path, caption, size, pick_bucket(*size, buckets)))
    if not dataset.items:
        raise UserError(_nothing_usable(folder, dataset.skipped, recipe.caption_extension))
    return dataset


def _check(path: Path, caption_extension: str) -> tuple[str, Size] | str:
    """(caption, size) for a usable image, or the reason it is not."""
    if not path.is_file():
        try:
            path.stat()
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"
        return "not a regular file"
    caption_path = path.with_name(path.stem + caption_extension)
    if not caption_path.is_file():
        return f"no caption file ({caption_path.name})"
    try:
        caption = read_caption(caption_path)
        size = check_image(path)
    except (BadCaption, BadImage) as e:
        return e.reason
    return caption, size


def _reason_counts(skipped: list[tuple[Path, str]]) -> str:
    # Reasons carry details in parentheses; count by the phrase before them.
    counts = Counter(why.split(" (")[0] for _, why in skipped)
    return ", ".join(f"{n} {why}" for why, n in counts.most_common())


def _nothing_usable(folder: Path, skipped: list[tuple[Path, str]], caption_extension: str) -> str:
    if not skipped:
        subfolders = any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
        where = " (subfolders are not searched)" if subfolders else ""
        return f"{folder} has no PNG, JPEG or WebP images{where}; put images with same-stem {caption_extension} captions in it."
    return (
        f"{folder} has no usable images: all {len(skipped)} were skipped "
        f"({_reason_counts(skipped)}); fix or remove them and try again."
    )


def epoch_batches(items_or_buckets: Sequence[Item] | Sequence[Size], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches as lists of item indices; a pure function of its arguments.

    Items are grouped by bucket (buckets in sorted order, items in their given order), each
    bucket shuffled with random.Random(seed + epoch) and cut into batches of `batch_size` (a
    bucket's last batch may be smaller), then the list of batches is shuffled with the same rng.
    A batch never mixes buckets.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    groups: dict[Size, list[int]] = defaultdict(list)
    for index, entry in enumerate(items_or_buckets):
        groups[tuple(getattr(entry, "bucket", entry))].append(index)
    rng = random.Random(seed + epoch)
    batches = []
    for bucket in sorted(groups):
        indices = groups[bucket]
        rng.shuffle(indices)
        batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
    rng.shuffle(batches)
    return batches
