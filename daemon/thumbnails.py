"""Sample and preview images as the API sends them: decoded here, in the server, checked against
decompression bombs first, and shrunk to the size the client asked for."""

from __future__ import annotations

import io
from pathlib import Path

from loradrop.proto.v1 import loradrop_pb2 as pb

from .errors import RequestError


def image_message(path: Path, max_size: int) -> pb.Image:
    from PIL import Image

    try:
        with Image.open(path) as image:
            original = image.size
            if (
                original[0] * original[1] > Image.MAX_IMAGE_PIXELS
            ):  # decoded here, in the server: refuse bombs first
                raise RequestError(f"{path} is {original[0]}x{original[1]}, too large to send as a sample.")
            image.load()
            if max_size and max(original) > max_size:
                image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            image.save(out, format="PNG")
            size = image.size
    except RequestError:
        raise
    # Pillow reports bad data with many exception types (SyntaxError, ValueError, its
    # DecompressionBombError...); all mean the same here.
    except Exception as e:
        raise RequestError(f"{path} is not a readable image ({str(e) or type(e).__name__}).") from None
    return pb.Image(
        path=str(path),
        png=out.getvalue(),
        width=size[0],
        height=size[1],
        original_width=original[0],
        original_height=original[1],
    )
