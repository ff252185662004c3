"""kohya's folder layout: a dataset folder of `N_name/` subfolders, each one a subset.

sd-scripts (library/config_util.py, generate_dreambooth_subsets_config_by_subdirs) reads a
subfolder's name as `name.split("_")`: the first token, read by int(), is `num_repeats` (each image
listed that many times per epoch), the rest joined by "_" is `class_tokens`, the caption of an image
that has no caption file. A subfolder whose first token is not an integer, or is below 1, is
ignored (kohya logs "ignore directory without repeats"); its subfolders are not searched either.
Regularization images (kohya's --reg_data_dir, trained with prior_loss_weight) are not supported:
a `reg/` subfolder is refused rather than trained on as if it were the subject.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS

# Names kohya users give the regularization set when it sits beside or inside the image folder.
REG_NAMES = {"reg", "regs", "regularization", "regularisation", "reg_data", "reg_data_dir"}


@dataclass
class Subset:
    """One folder whose images train: the dataset folder's own (name "") or an `N_name/` subfolder."""

    folder: Path
    name: str  # "" for the dataset folder itself
    repeats: int  # kohya's num_repeats; the dataset folder's own images use dataset_repeats
    class_tokens: str | None  # caption of an image without a caption file; None: such images are skipped
    images: int = 0
    skipped: int = 0
    uncaptioned: int = 0  # images trained on class_tokens because they have no caption file

    def report(self) -> str:
        where = f"{self.name}/" if self.name else "the folder's own images"
        line = (
            f"{where}: {self.images} image{'s' if self.images != 1 else ''} x {self.repeats} "
            f"repeat{'s' if self.repeats != 1 else ''} = {self.images * self.repeats} per epoch, {self.skipped} skipped"
        )
        if self.uncaptioned and self.class_tokens:
            line += f", {self.uncaptioned} without a caption file captioned {self.class_tokens!r} (from the folder name)"
        elif self.uncaptioned:  # `10_/`: kohya trains these on the empty caption
            line += f", {self.uncaptioned} without a caption file trained on the empty caption (the folder name has no class tokens)"
        return line


def kohya_repeats(name: str) -> tuple[int, str] | None:
    """(num_repeats, class_tokens) as kohya reads a subfolder name, or None where kohya ignores it."""
    tokens = name.split("_")
    try:
        repeats = int(tokens[0])
    except ValueError:
        return None
    if repeats < 1:
        return None
    return repeats, "_".join(tokens[1:])


@dataclass
class Subfolders:
    subsets: list[Subset]  # the N_name/ subfolders, sorted by name
    ignored: list[str]  # subfolders holding images whose name kohya does not read
    regularization: str | None  # a reg/ subfolder's name, which the scan refuses


def classify(folder: Path) -> Subfolders:
    """Sort the folder's own subfolders (not hidden, symlinks not followed: a link loop or a link
    out of the daemon's inbox is never walked) into kohya subsets and ignored ones."""
    found = Subfolders([], [], None)
    try:
        with os.scandir(folder) as entries:
            names = sorted(
                e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
            )
    except OSError:
        return found  # an unreadable folder fails its own listing, with its reason, in scan
    for name in names:
        parsed = kohya_repeats(name)
        if parsed is not None:
            found.subsets.append(Subset(folder / name, name, parsed[0], parsed[1]))
        elif _has_images(folder / name):
            if name.lower() in REG_NAMES:
                found.regularization = found.regularization or name
            else:
                found.ignored.append(name)
    return found


def _has_images(folder: Path) -> bool:
    try:
        with os.scandir(folder) as inner:
            if any(
                Path(e.name).suffix.lower() in IMAGE_EXTENSIONS and not e.name.startswith(".") for e in inner
            ):
                return True
        with os.scandir(folder) as inner:  # reg/1_woman/: kohya's layout one level down
            return any(e.is_dir(follow_symlinks=False) and kohya_repeats(e.name) is not None for e in inner)
    except OSError:
        return False  # an unreadable subfolder is no reason to fail a scan of its parent
