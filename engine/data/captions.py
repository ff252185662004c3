"""Captions: the first line of a same-stem text file, processed on every fetch as kohya's
BaseDataset.process_caption does (caption_separator ","): the whole caption dropped with
caption_dropout_rate; else, past the first keep_tokens tags, the tags shuffled (shuffle_caption)
and then each dropped with caption_tag_dropout_rate."""

from __future__ import annotations

import os
import random
from pathlib import Path

MAX_CAPTION_BYTES = 1 << 20


class BadCaption(Exception):
    """A caption file that cannot be used; `reason` is a short phrase for the skipped-files list."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_caption(path: str | os.PathLike) -> str:
    """The first line, stripped. Strict UTF-8 (a byte-order mark is allowed); an empty file is the
    empty caption. Lines end at \\n, \\r\\n or \\r, as Python's text mode reads them for kohya."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if (
                size > MAX_CAPTION_BYTES
            ):  # a caption is a line of tags; a file of gigabytes is a mistake (or sparse)
                raise BadCaption(
                    f"caption file too large ({path.name}: {size:,} bytes; at most {MAX_CAPTION_BYTES >> 20} MB)"
                )
            data = f.read(MAX_CAPTION_BYTES)
    except OSError as e:
        raise BadCaption(f"caption cannot be read ({path.name}: {e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadCaption(
            f"caption not UTF-8 ({path.name}: byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None
    first = text.replace("\r\n", "\n").replace("\r", "\n").split("\n", 1)[0]
    return first.strip()


def shuffle_caption(caption: str, rng: random.Random, keep_tokens: int = 0) -> str:
    """Split on ",", strip, drop empty tags, keep the first `keep_tokens` in place, shuffle the
    rest with `rng`, join with ", "."""
    return process_caption(caption, rng, shuffle=True, keep_tokens=keep_tokens)


def process_caption(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool,
    keep_tokens: int = 0,
    dropout_rate: float = 0.0,
    tag_dropout_rate: float = 0.0,
) -> str:
    """kohya's order: caption dropout first (the caption becomes ""), then shuffle, then tag
    dropout of the tags not kept. `rng` is drawn from only for a rate above 0, so a recipe
    without dropout trains exactly as before the rates existed."""
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle and tag_dropout_rate <= 0:
        return caption  # kohya leaves the caption as written when it neither shuffles nor drops tags
    tags = [t for t in (part.strip() for part in caption.split(",")) if t]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        rng.shuffle(rest)
    if tag_dropout_rate > 0:
        rest = [t for t in rest if rng.random() >= tag_dropout_rate]
    return ", ".join(fixed + rest)
