"""Captions: the first line of a same-stem text file, shuffled by tag on every fetch (kohya's
shuffle_caption with caption_separator ",")."""

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
            if size > MAX_CAPTION_BYTES:  # a caption is a line of tags; a file of gigabytes is a mistake (or sparse)
                raise BadCaption(f"caption file too large ({path.name}: {size:,} bytes; at most {MAX_CAPTION_BYTES >> 20} MB)")
            data = f.read(MAX_CAPTION_BYTES)
    except OSError as e:
        raise BadCaption(f"caption cannot be read ({path.name}: {e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadCaption(f"caption not UTF-8 ({path.name}: byte 0x{data[e.start]:02x} at offset {e.start})") from None
    first = text.replace("\r\n", "\n").replace("\r", "\n").split("\n", 1)[0]
    return first.strip()


def shuffle_caption(caption: str, rng: random.Random, keep_tokens: int = 0) -> str:
    """Split on ",", strip, drop empty tags, keep the first `keep_tokens` in place, shuffle the
    rest with `rng`, join with ", "."""
    tags = [t for t in (part.strip() for part in caption.split(",")) if t]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(fixed + rest)
