"""A dataset folder: images with same-stem captions, checked, bucketed, and batched per epoch.

The folder's own images train `dataset_repeats` times per epoch; kohya's `N_name/` subfolders
(see subsets.py) train N times each, and their images without a caption file take the name's
class tokens as caption, as kohya does.

`scan` reads headers only (plus cheap structural checks, see images.check_image), in threads, so a
folder of thousands of images scans in seconds; pixels are decoded once, by the latent cache.
Every image that cannot be used is listed with its reason in `Dataset.skipped`; the scan fails
with one sentence only when nothing usable remains.
"""

from __future__ import annotations

import os
import random
import stat
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
from .subsets import Subset, classify

_LISTED = 20  # skipped files named one by one in the warning; the rest are counted
MAX_LISTED_ITEMS = 10_000_000  # images × repeats: the per-epoch list the loop builds


FileId = tuple[int, int]  # (st_dev, st_ino): a file's identity across renames


@dataclass(frozen=True)
class Item:
    path: Path  # the image, where the scan found it
    caption: str  # first line of the caption file, unshuffled
    size: Size  # upright (w, h), EXIF orientation applied
    bucket: Size  # (w, h)
    file_id: FileId | None = None  # the image's identity, and its folder's: renames are followed
    folder_id: FileId | None = None
    repeats: int = 1  # times listed per epoch: dataset_repeats, or the N of its N_name/ subfolder
    subset: str = ""  # its N_name/ subfolder, "" for the dataset folder's own images
    root_id: FileId | None = None  # the dataset folder's identity, for an image in a subfolder

    def current_path(self) -> Path:
        """Where the image is now. A rename since the scan, of the file or of the dataset folder
        (the daemon's inbox follows folders by inode), is followed by inode; an image that is gone
        keeps its old path, and reading it says so."""
        path = Path(self.path)
        if self.file_id is None or _is(path, self.file_id):
            return path
        folder = path.parent
        if self.folder_id is not None and not _is(folder, self.folder_id):
            root = folder.parent
            if self.root_id is not None and not _is(root, self.root_id):
                root = _find(root.parent, self.root_id) or root  # the dataset folder itself was renamed
            folder = _find(root, self.folder_id) or folder
        if _is(folder / path.name, self.file_id):
            return folder / path.name
        return _find(folder, self.file_id) or path


@dataclass
class Dataset:
    folder: Path
    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    subfolders: list[str] = field(
        default_factory=list
    )  # subfolders holding images not named N_name: not searched
    orphans: list[str] = field(default_factory=list)  # caption files with no image of their stem
    subsets: list[Subset] = field(default_factory=list)  # the folder's own images first, then each N_name/

    @property
    def images_per_epoch(self) -> int:
        return sum(item.repeats for item in self.items)

    def scan_report(self) -> list[str]:
        """One line per subset (images, repeats, skipped), for a kohya layout; a flat folder's
        counts are already in the skipped warning."""
        if not any(s.name for s in self.subsets):
            return []
        used = [s for s in self.subsets if s.name or s.images or s.skipped]
        return [
            f"{self.folder}: {len(self.items)} images, {self.images_per_epoch} per epoch, from "
            f"{len(used)} folder{'s' if len(used) != 1 else ''} (kohya's N_name layout)"
        ] + [f"  {s.report()}" for s in used]

    def orphan_warning(self) -> str | None:
        """Captions without an image are usually a renamed or deleted picture: say which."""
        if not self.orphans:
            return None
        names = ", ".join(self.orphans[:_LISTED]) + (
            f" and {len(self.orphans) - _LISTED} more" if len(self.orphans) > _LISTED else ""
        )
        return f"{self.folder} has caption files with no image of the same name ({names}); they are not used."

    def subfolder_warning(self) -> str | None:
        """Images in subfolders kohya would not read are not trained on; say so rather than leave
        them out silently."""
        if not self.subfolders:
            return None
        names = ", ".join(f"{n}/" for n in self.subfolders[:_LISTED])
        return (
            f"{self.folder} has images in subfolders ({names}); they are not used, only the folder's own images "
            "and N_name/ subfolders (kohya's layout, N repeats) train: rename them N_name or move their images up."
        )

    def skipped_warning(self) -> str | None:
        """One warning naming every skipped file (the first few by name) and why, or None."""
        if not self.skipped:
            return None
        named = "; ".join(f"{_relative(p, self.folder)}: {why}" for p, why in self.skipped[:_LISTED])
        more = len(self.skipped) - _LISTED
        tail = f"; and {more} more ({_reason_counts(self.skipped[_LISTED:])})" if more > 0 else ""
        return (
            f"Skipped {len(self.skipped)} of {len(self.skipped) + len(self.items)} images in "
            f"{self.folder}: {named}{tail}."
        )


def scan(folder: str | os.PathLike, recipe: Recipe) -> Dataset:
    """Find every usable image in `folder` and its `N_name/` subfolders, and give it a bucket."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(
            f"{folder} {what}; expected a folder of images with same-stem {recipe.caption_extension} captions."
        )
    subfolders = classify(folder)
    if subfolders.regularization:
        raise UserError(
            f"{folder / subfolders.regularization} looks like a kohya regularization set, which loradrop does "
            f"not train with (no prior loss); move {subfolders.regularization}/ out of the dataset folder."
        )
    if recipe.enable_bucket:
        buckets = make_buckets(
            recipe.resolution, recipe.min_bucket_reso, recipe.max_bucket_reso, recipe.bucket_reso_steps
        )
    else:
        buckets = [(recipe.resolution, recipe.resolution)]
    own = Subset(folder, "", recipe.dataset_repeats, None)  # a flat folder's images need captions, as before
    dataset = Dataset(folder, subfolders=subfolders.ignored, subsets=[own, *subfolders.subsets])
    root_id = _file_id(folder.stat())
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        for subset in dataset.subsets:
            _scan_subset(subset, dataset, recipe, buckets, pool, root_id if subset.name else None)
    if not dataset.items:
        raise UserError(
            _nothing_usable(folder, dataset.skipped, recipe.caption_extension, len(dataset.subsets) > 1)
        )
    if dataset.images_per_epoch > MAX_LISTED_ITEMS:
        worst = max(dataset.subsets, key=lambda s: s.images * s.repeats)
        what = (
            f"{worst.name}/ repeats {worst.repeats} times"
            if worst.name
            else f"dataset_repeats is {worst.repeats}"
        )
        fix = f"rename {worst.name}/ with a smaller N" if worst.name else "lower dataset_repeats"
        raise UserError(
            f"{folder}: an epoch would list {dataset.images_per_epoch:,} images ({what}), more than "
            f"{MAX_LISTED_ITEMS:,}; {fix}."
        )
    return dataset


def _scan_subset(
    subset: Subset,
    dataset: Dataset,
    recipe: Recipe,
    buckets: list[Size],
    pool: ThreadPoolExecutor,
    root_id: FileId | None,
) -> None:
    # Only image names are candidates: captions, sample-prompts.txt, loradrop.toml and anything
    # else are not, and hidden files (editors', macOS's ._ twins) never are.
    folder = subset.folder
    try:
        candidates = sorted(
            entry
            for entry in folder.iterdir()
            if not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS
        )
        folder_id = _file_id(folder.stat())
    except OSError as e:
        raise UserError(f"{folder} cannot be listed ({e.strerror or e}); check its permissions.") from None
    checked = pool.map(lambda p: _check(p, recipe.caption_extension, subset.class_tokens), candidates)
    for path, result in zip(candidates, checked):
        if isinstance(result, str):
            dataset.skipped.append((path, result))
            subset.skipped += 1
        else:
            caption, size, file_id, uncaptioned = result
            dataset.items.append(
                Item(
                    path,
                    caption,
                    size,
                    pick_bucket(*size, buckets),
                    file_id,
                    folder_id,
                    subset.repeats,
                    subset.name,
                    root_id,
                )
            )
            subset.images += 1
            subset.uncaptioned += uncaptioned
    prefix = f"{subset.name}/" if subset.name else ""
    dataset.orphans += [prefix + n for n in _orphan_captions(folder, candidates, recipe.caption_extension)]


# Text files a dataset folder holds that are not captions.
_NOT_CAPTIONS = {"sample-prompts.txt"}


def _orphan_captions(folder: Path, images: list[Path], caption_extension: str) -> list[str]:
    stems = {p.stem for p in images}
    try:
        names = sorted(
            e.name
            for e in os.scandir(folder)
            if not e.name.startswith(".")
            and e.name.endswith(caption_extension)
            and e.name not in _NOT_CAPTIONS
            and e.is_file(follow_symlinks=False)
        )
    except OSError:
        return []
    return [n for n in names if n[: -len(caption_extension)] not in stems]


def _check(
    path: Path, caption_extension: str, class_tokens: str | None
) -> tuple[str, Size, FileId, bool] | str:
    """(caption, size, identity, captioned by class_tokens) for a usable image, or the reason it is not."""
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    caption_path = path.with_name(path.stem + caption_extension)
    uncaptioned = not caption_path.is_file()
    if uncaptioned and class_tokens is None:
        return f"no caption file ({caption_path.name})"
    try:
        caption = class_tokens if uncaptioned else read_caption(caption_path)
        size = check_image(path)
    except (BadCaption, BadImage) as e:
        return e.reason
    return caption, size, _file_id(st), uncaptioned


def _file_id(st: os.stat_result) -> FileId:
    return (st.st_dev, st.st_ino)


def _is(path: Path, file_id: FileId) -> bool:
    try:
        return _file_id(path.stat()) == file_id
    except OSError:
        return False


def _find(folder: Path, file_id: FileId) -> Path | None:
    """The entry of `folder` that is `file_id` (renamed), or None."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.inode() == file_id[1] and _is(Path(entry.path), file_id):
                    return Path(entry.path)
    except OSError:
        pass
    return None


def _reason_counts(skipped: list[tuple[Path, str]]) -> str:
    # Reasons carry details in parentheses; count by the phrase before them.
    counts = Counter(why.split(" (")[0] for _, why in skipped)
    return ", ".join(f"{n} {why}" for why, n in counts.most_common())


def _relative(path: Path, folder: Path) -> str:
    return path.name if path.parent == folder else f"{path.parent.name}/{path.name}"


def _nothing_usable(
    folder: Path, skipped: list[tuple[Path, str]], caption_extension: str, kohya: bool = False
) -> str:
    if not skipped and kohya:
        return f"{folder} and its N_name subfolders have no PNG, JPEG or WebP images; put images in them."
    if not skipped:
        subfolders = any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
        where = " (subfolders are not searched unless named N_name, kohya's layout)" if subfolders else ""
        return f"{folder} has no PNG, JPEG or WebP images{where}; put images with same-stem {caption_extension} captions in it."
    return (
        f"{folder} has no usable images: all {len(skipped)} were skipped "
        f"({_reason_counts(skipped)}); fix or remove them and try again."
    )


def epoch_batches(
    items_or_buckets: Sequence[Item] | Sequence[Size], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
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
