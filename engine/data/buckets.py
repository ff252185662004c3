"""Aspect-ratio buckets, as kohya's make_bucket_resolutions and BucketManager.select_bucket make
them, and the resize-and-crop that brings an image to its bucket (recipe.md, "Buckets").

Sizes are (width, height) throughout, except where SDXL's size conditioning wants (h, w) pairs:
`fit_to_bucket` returns the crop as (top, left) and the original size as (h, w).
"""

from __future__ import annotations

import math

from PIL import Image

Size = tuple[int, int]


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """Every (w, h) of area at most resolution², sides multiples of `step` in [min_reso, max_reso],
    plus the largest square; sorted. 81 buckets for the seed's 1024, 256, 2048, 32."""
    area = resolution * resolution
    side = math.isqrt(area) // step * step
    buckets = {(side, side)}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, area // width // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def pick_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    """The bucket of exactly this size if there is one, else the nearest aspect ratio (the first
    in the given order on ties, as numpy's argmin picks in kohya). Upscaling is allowed."""
    if (width, height) in buckets:
        return (width, height)
    ratio = width / height
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """The size the image is resized to: the smallest that covers the bucket at the image's own
    aspect ratio, each side rounded half up."""
    bw, bh = bucket
    # The image is wider than the bucket: match heights (and crop the sides); else match widths.
    scale = bh / height if width / height > bw / bh else bw / width
    return max(bw, int(width * scale + 0.5)), max(bh, int(height * scale + 0.5))


def fit_to_bucket(img: Image.Image, bucket: Size) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize `img` to cover `bucket` and centre-crop it.

    Returns (image of exactly the bucket's size, crop (top, left) in resized pixels, original
    size (h, w)). The crop is the one actually done; kohya reports the left offset on the wrong
    axis (its issue 1443), which is not reproduced.
    """
    width, height = img.size
    new_w, new_h = cover_size(width, height, bucket)
    if (new_w, new_h) != (width, height):
        # Shrinking both sides: an area (box) average, as kohya's cv2.INTER_AREA; otherwise Lanczos.
        shrinking = new_w < width and new_h < height
        img = img.resize((new_w, new_h), Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)
    bw, bh = bucket
    top, left = (new_h - bh) // 2, (new_w - bw) // 2
    if (new_w, new_h) != bucket:
        img = img.crop((left, top, left + bw, top + bh))
    return img, (top, left), (height, width)
