"""Reading training images: any mode PNG, JPEG or WebP in, 8-bit RGB out, bad files refused.

Two entry points with one set of rules:
- `check_image` is the scan's cheap look: the header, the pixel count, the EXIF orientation and a
  structural check that finds truncated and corrupt files without decoding pixels.
- `load_rgb` is the cache step's full decode.

Choices, for the record:
- Animated PNG/WebP and multi-picture JPEG (MPO, as many phones write) train on their first frame,
  as kohya does.
- Transparency is composited over white (RGBA, LA, PA, P with a transparent index, and RGB, L or
  16-bit grey with a tRNS colour).
- 16-bit grey (I;16*) and 32-bit integer (I) are read as 16-bit ranges and scaled to 8 bits;
  float (F) is read as 0..1. Pillow's own convert() would clip them to 0..255 instead.
- Anything over `MAX_PIXELS` is refused from its header, before a byte of pixels is decoded.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import (
    ExifTags,
    Image,
    ImageOps,
    WebPImagePlugin,  # noqa: F401  (registers WebP, which Image.open's quick start leaves out)
)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
MAX_PIXELS = 128 * 1024 * 1024
_FORMATS = ("PNG", "JPEG", "WEBP")  # a JPEG with several pictures (phones) opens as format MPO
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90°
_WHITE = (255, 255, 255)
_TOO_LARGE = f"over {MAX_PIXELS // 2**20} MP: a possible decompression bomb"


class BadImage(Exception):
    """An image that cannot be used; `reason` is a short phrase for the skipped-files list."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """The image's upright (width, height), from its header; raises BadImage for an unusable file.

    Reads the whole file only for PNG (its chunk checksums catch corruption at about 1 GB/s), for
    WebP (Pillow parses the whole container on open) and for the rare JPEG that does not end with
    its end-of-image marker (decoded at 1/8 scale to tell a truncated file from one with trailing
    bytes). Corrupt JPEG or WebP pixel data passes: those decoders do not notice it either.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise BadImage("empty file")
            with _open(f) as img:
                width, height = img.size
                orientation = _orientation(img)
                _check_structure(img, f)
    except OSError as e:
        raise BadImage(_read_error(e)) from None
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


def load_rgb(path: str | os.PathLike, data: bytes | None = None) -> Image.Image:
    """Decode an image to upright 8-bit RGB. `data`, when given, is the file's content already read
    (the latent cache hashes and decodes the same bytes, so a file changed meanwhile cannot mix)."""
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BadImage(_read_error(e)) from None
    if not data:
        raise BadImage("empty file")
    with _open(io.BytesIO(data)) as img:
        try:
            img.load()
        # Pillow's decoders report bad data with many exception types; all mean the same here.
        except Exception as e:
            raise _decode_error(e) from None
        try:
            upright = ImageOps.exif_transpose(img)
        except Exception:  # malformed EXIF: the pixels are fine, keep them as stored
            upright = img.copy()
    return to_rgb(upright)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, transparency composited over white."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _deep_to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        "transparency" in img.info and img.mode in ("P", "L", "RGB")
    ):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE + (255,)), rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError:
        raise BadImage(f"unsupported image mode {img.mode}") from None


def _deep_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey to L (or LA, keeping a tRNS grey value as transparency)."""
    values = np.asarray(img)
    if img.mode == "F":
        grey = np.clip(values, 0.0, 1.0) * 255.0
    else:
        grey = np.clip(values.astype(np.float64), 0, 65535) / 257.0
    out = Image.fromarray(np.rint(grey).astype(np.uint8), "L")
    transparent = img.info.get("transparency")
    if isinstance(transparent, int) and img.mode != "F":
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        out = Image.merge("LA", (out, Image.fromarray(alpha, "L")))
    return out


def _open(source: BinaryIO) -> Image.Image:
    """Open without decoding pixels, refusing other formats and oversized images."""
    try:
        img = Image.open(source, formats=_FORMATS)
    except Image.DecompressionBombError:
        raise BadImage(f"too large ({_TOO_LARGE})") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not a PNG, JPEG or WebP image") from None
    except OSError as e:
        raise _decode_error(e) from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise BadImage(f"too large ({width}x{height}, {_TOO_LARGE})")
    return img


def _orientation(img: Image.Image) -> int:
    # The base class's getexif reads only what the header gave; PNG's override decodes the whole
    # image to look for an eXIf chunk after the pixel data, which a scan cannot afford.
    try:
        return int(Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1) or 1)
    except Exception:  # malformed EXIF: load_rgb keeps such pixels as stored, and so does this
        return 1


def _check_structure(img: Image.Image, f: BinaryIO) -> None:
    try:
        if img.format == "PNG":
            img.verify()
        elif img.format in ("JPEG", "MPO") and not _ends_with_jpeg_eoi(f):
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        # WebP: Pillow's decoder parses the whole container on open, which already failed
        # for a truncated file.
    except Exception as e:  # as in load_rgb: Pillow's many exception types for bad data
        raise _decode_error(e) from None


def _ends_with_jpeg_eoi(f: BinaryIO) -> bool:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 64))
    tail = f.read().rstrip(b"\0")  # some writers pad after the marker
    return tail.endswith(b"\xff\xd9")


def _decode_error(e: Exception) -> BadImage:
    text = str(e) or type(e).__name__
    if isinstance(e, EOFError) or "truncated" in text.lower():
        return BadImage("truncated")
    return BadImage(f"corrupt ({text})")


def _read_error(e: OSError) -> str:
    return f"cannot be read ({e.strerror or e})"
