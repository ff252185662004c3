"""Hostile dataset files, made for real with Pillow (or by hand where Pillow refuses to write
them): what a careless or malicious drop into the inbox may contain.

Each kind says what a scan must make of it: "item" (trains), "skipped" (listed with a reason
that contains `reason`), or "either" (a file whose damage only a full decode may notice; if the
scan keeps it, decoding it must fail cleanly or give the picture).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


def _pixels(seed: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def rgb(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(_pixels(seed, size), "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height, with almost no data: a decompression bomb's face."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 4))
        + png_chunk(b"IEND", b"")
    )


def animated(fmt: str, seed: int) -> bytes:
    frames = [rgb(seed + i) for i in range(3)]
    return _save(
        frames[0],
        fmt,
        save_all=True,
        append_images=frames[1:],
        duration=50,
        loop=0,
        **({"lossless": True} if fmt == "WEBP" else {}),
    )


def png16(seed: int) -> bytes:
    values = np.random.default_rng(seed).integers(0, 65536, (64, 64), dtype=np.uint16)
    return _save(Image.fromarray(values), "PNG")  # mode I;16


def cmyk_jpeg(seed: int) -> bytes:
    return _save(rgb(seed).convert("CMYK"), "JPEG", quality=90)


def truncated(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


@dataclass(frozen=True)
class Kind:
    make: Callable[[int], bytes]  # seed -> the file's bytes
    suffix: str
    expect: str  # "item", "skipped", "either"
    reason: str = ""  # a phrase the skipped reason contains


KINDS: dict[str, Kind] = {
    "png": Kind(lambda s: _save(rgb(s), "PNG"), ".png", "item"),
    "jpeg": Kind(lambda s: _save(rgb(s), "JPEG"), ".jpg", "item"),
    "webp": Kind(lambda s: _save(rgb(s), "WEBP", lossless=True), ".webp", "item"),
    "rgba_png": Kind(lambda s: _save(rgb(s).convert("RGBA"), "PNG"), ".png", "item"),
    "palette_png": Kind(lambda s: _save(rgb(s).convert("P"), "PNG"), ".png", "item"),
    "grey_jpeg": Kind(lambda s: _save(rgb(s).convert("L"), "JPEG"), ".jpeg", "item"),
    "png16": Kind(png16, ".png", "item"),
    "cmyk_jpeg": Kind(cmyk_jpeg, ".jpg", "item"),
    "animated_png": Kind(lambda s: animated("PNG", s), ".png", "item"),
    "animated_webp": Kind(lambda s: animated("WEBP", s), ".webp", "item"),
    "odd_size": Kind(lambda s: _save(rgb(s, (1, 300)), "PNG"), ".png", "item"),
    "png_named_jpg": Kind(
        lambda s: _save(rgb(s), "PNG"), ".jpg", "item"
    ),  # the content decides, not the name
    "gif_named_png": Kind(
        lambda s: _save(rgb(s).convert("P"), "GIF"), ".png", "skipped", "not a PNG, JPEG or WebP"
    ),
    "bmp_named_webp": Kind(lambda s: _save(rgb(s), "BMP"), ".webp", "skipped", "not a PNG, JPEG or WebP"),
    "huge_png": Kind(lambda s: huge_png(100_000, 100_000 + s % 7), ".png", "skipped", "too large"),
    "big_png": Kind(lambda s: huge_png(12_000, 12_000), ".png", "skipped", "too large"),
    "empty": Kind(lambda s: b"", ".png", "skipped", "empty file"),
    "garbage": Kind(lambda s: np.random.default_rng(s).bytes(500), ".jpg", "skipped", ""),
    "truncated_png": Kind(
        lambda s: truncated(_save(rgb(s), "PNG"), 0.1 + (s % 80) / 100), ".png", "skipped", ""
    ),
    "truncated_jpeg": Kind(
        lambda s: truncated(_save(rgb(s), "JPEG"), 0.3 + (s % 60) / 100), ".jpg", "either"
    ),
    "truncated_webp": Kind(
        lambda s: truncated(_save(rgb(s), "WEBP"), 0.2 + (s % 70) / 100), ".webp", "skipped", ""
    ),
}


def write_kind(
    folder: Path, stem: str | bytes, kind: str, seed: int, caption: bytes | None = b"a photo of zkw thing"
) -> Path:
    """Write one file of `kind` named stem + its suffix, with a caption (None: no caption file).
    A bytes stem makes a name that is not UTF-8."""
    k = KINDS[kind]
    base = os.fsencode(folder) + b"/" + (stem if isinstance(stem, bytes) else stem.encode())
    path = base + k.suffix.encode()
    with open(path, "wb") as f:
        f.write(k.make(seed))
    if caption is not None:
        with open(base + b".txt", "wb") as f:
            f.write(caption)
    return Path(os.fsdecode(path))
