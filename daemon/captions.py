"""The caption stage's settings and its first check, shared by intake (the server process) and
the worker. Nothing here imports torch or a caption model: intake judges a folder's captions
without loading anything, the worker loads the captioner (daemon/caption_stage.py).

A job's caption settings come from its folder's loradrop.toml (`caption_model`, `caption_kind`,
`trigger`, `review`), the daemon's `--captioner`/`--captioner-kind` filling in a missing model, and
are frozen with the job like its recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loradrop.engine.caption.run import caption_path, list_images
from loradrop.errors import UserError

from .records import CaptionSettings

CAPTION_KEYS = ("caption_model", "caption_kind", "trigger", "review")  # loradrop.toml keys
KINDS = ("tagger", "vlm")
_NAMED = 3  # images named in the "no caption" sentence
_TRIGGER_LIMIT = 100


def resolve(
    values: dict[str, Any], source: Path, *, captioner: str | None, captioner_kind: str | None, model_path
) -> CaptionSettings:
    """The frozen settings from the folder file's caption keys (popped from `values`).
    `model_path(text)` resolves a caption_model the way a base model is (inside models/)."""
    given = {k: values.pop(k) for k in CAPTION_KEYS if k in values}
    for key in ("caption_model", "caption_kind", "trigger"):
        if key in given and not isinstance(given[key], str):
            raise UserError(f"{source}: {key} must be a string, not {given[key]!r}.")
    if "review" in given and not isinstance(given["review"], bool):
        raise UserError(f"{source}: review must be true or false, not {given['review']!r}.")
    trigger = given.get("trigger", "").strip()
    if any(c in trigger for c in ",\n\r") or len(trigger) > _TRIGGER_LIMIT:
        raise UserError(
            f"{source}: trigger {trigger[:40]!r} must be one word or phrase without commas or line breaks, at most {_TRIGGER_LIMIT} characters."
        )
    kind = given.get("caption_kind", "")
    if kind and kind not in KINDS:
        raise UserError(f'{source}: caption_kind must be "tagger" or "vlm", not {kind!r}.')
    model = None
    if given.get("caption_model"):
        model = str(model_path(given["caption_model"]))
        check_model(Path(model), kind, f"{source}: caption_model")
    elif captioner:
        model, kind = captioner, kind or captioner_kind or ""
    return CaptionSettings(model=model, kind=kind, trigger=trigger, review=given.get("review", False))


def check_model(path: Path, kind: str, what: str) -> None:
    """Refuse a caption model path that holds neither layout, before a worker tries to load it."""
    tagger = path.suffix == ".onnx" or (path / "model.onnx").is_file()
    vlm = (path / "config.json").is_file()
    if (kind == "tagger" and not tagger) or (kind == "vlm" and not vlm) or not (tagger or vlm):
        want = {"tagger": "model.onnx and selected_tags.csv", "vlm": "config.json"}.get(
            kind, "model.onnx (a WD14 tagger) or config.json (a transformers VLM)"
        )
        raise UserError(
            f"{what} {path} holds no {want}; give a folder in that layout (see docs/captions.md)."
        )


def missing(folder: Path, extension: str) -> tuple[list[Path], list[Path]]:
    """(the folder's images, those without a same-stem caption file)."""
    images = list_images(folder)
    return images, [p for p in images if not caption_path(p, extension).exists()]


def refuse_uncaptioned(
    folder: Path, extension: str, settings: CaptionSettings, shown: str | None = None
) -> None:
    """Without a captioner, images lacking captions fail the job now, naming them and the fix."""
    if settings.model:
        return
    images, lacking = missing(folder, extension)
    if not lacking:
        return
    where = shown or str(folder)
    names = ", ".join(p.name for p in lacking[:_NAMED]) + (
        f" and {len(lacking) - _NAMED} more" if len(lacking) > _NAMED else ""
    )
    raise UserError(
        f"{len(lacking)} of {len(images)} images in {where} have no {extension} caption ({names}); caption them with "
        f"`loradrop caption {where} --model PATH --missing-only`, or give the daemon a captioner (`loradrop daemon --captioner PATH`, "
        f"or caption_model in {Path(where).name}/loradrop.toml), then retry the job."
    )


# ---------------------------------------------------------------------- reading and editing (the API)

MAX_CAPTION_CHARS = 10_000  # a caption is a line of tags or a sentence or two


@dataclass(frozen=True)
class CaptionEntry:
    """An image and its caption, as the API's Caption message has them."""

    image: str
    caption_file: str
    text: str
    exists: bool


def listing(folder: Path, extension: str) -> list[CaptionEntry]:
    """Every image of the folder with its caption as training would read it (its first line)."""
    from loradrop.engine.data.captions import BadCaption, read_caption

    from .security import printable

    out = []
    for image in list_images(folder):
        target = caption_path(image, extension)
        exists, text = target.is_file(), ""
        if exists:
            try:
                text = read_caption(target)
            except BadCaption as e:  # shown in place of the caption, so the person fixes it
                text = f"({e.reason})"
        out.append(CaptionEntry(printable(str(image)), printable(str(target)), printable(text), exists))
    return out


def write(folder: Path, extension: str, image: str, text: str) -> CaptionEntry:
    """Write one image's caption file atomically; the image is named by path or by file name and
    must be one of the folder's images (never a path elsewhere)."""
    from loradrop.fsutil import atomic_write_text

    from .errors import NotFound, RequestError
    from .security import printable

    if "\n" in text or "\r" in text or len(text) > MAX_CAPTION_CHARS:
        raise RequestError(
            f"a caption is one line of at most {MAX_CAPTION_CHARS:,} characters; join the lines with commas."
        )
    given = Path(image)
    images = {printable(p.name): p for p in list_images(folder)}
    found = (
        images.get(given.name) if image in (given.name, str(folder / given.name)) else None
    )  # a bare name, or a path in the folder
    if found is None:
        raise NotFound(f"{image!r} is not an image of {folder}; ListCaptions names them.")
    target = caption_path(found, extension)
    atomic_write_text(target, text.strip() + "\n")
    return CaptionEntry(printable(str(found)), printable(str(target)), text.strip(), True)
