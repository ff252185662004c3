"""Buckets exactly as recipe.md, bucket choice, and the resize-and-crop to a bucket."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loradrop.engine.data.buckets import cover_size, fit_to_bucket, make_buckets, pick_bucket

SEED = make_buckets(1024, 256, 2048, 32)


def test_seed_buckets():
    assert len(SEED) == 81
    assert SEED == sorted(SEED)
    assert len(set(SEED)) == 81
    for w, h in SEED:
        assert w % 32 == 0 and h % 32 == 0
        assert 256 <= w <= 2048 and 256 <= h <= 2048
        assert w * h <= 1024 * 1024
        assert (h, w) in SEED
    assert SEED[:3] == [(256, 2048), (288, 2048), (320, 2048)]
    assert SEED[-3:] == [(2048, 448), (2048, 480), (2048, 512)]
    for common in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 672), (832, 1216)]:
        assert common in SEED


def test_bucket_rule_by_hand():
    # h = min(max, floor((A // w) / step) * step), both orientations, plus the square.
    # A = 65536: w=128 -> 512, 192 -> 320, 256 -> 256, 320 -> 192, 384 -> 128, 448 -> 128, 512 -> 128.
    by_hand = {(256, 256), (128, 512), (192, 320), (320, 192), (384, 128), (448, 128), (512, 128)}
    by_hand |= {(h, w) for w, h in by_hand}
    assert make_buckets(256, 128, 512, 64) == sorted(by_hand)
    # A height below min_reso drops the pair: at A = 181², w = 512 gives 0.
    small = make_buckets(181, 128, 512, 64)
    assert small and min(min(b) for b in small) >= 128


def test_pick_bucket():
    assert pick_bucket(1024, 1024, SEED) == (1024, 1024)
    assert pick_bucket(500, 500, SEED) == (1024, 1024)  # upscaling is allowed
    assert pick_bucket(1920, 1080, SEED) == (1344, 768)
    assert pick_bucket(1080, 1920, SEED) == (768, 1344)
    assert pick_bucket(3000, 1000, SEED) == (1728, 576)
    assert pick_bucket(4000, 3000, SEED) == (1184, 864)
    assert pick_bucket(100, 4000, SEED) == (256, 2048)
    assert pick_bucket(832, 1216, SEED) == (832, 1216)


def test_exact_size_wins_then_first_on_ties():
    buckets = [(256, 128), (512, 256)]  # the same ratio twice
    assert pick_bucket(512, 256, buckets) == (512, 256)
    assert pick_bucket(600, 300, buckets) == (256, 128)
    assert pick_bucket(600, 300, buckets[::-1]) == (512, 256)


def test_cover_size_rounds_half_up():
    assert cover_size(1920, 1080, (1344, 768)) == (1365, 768)  # 1365.33
    assert cover_size(333, 100, (128, 64)) == (213, 64)  # 213.12
    assert cover_size(1000, 1000, (1024, 1024)) == (1024, 1024)
    assert cover_size(100, 333, (64, 128)) == (64, 213)


def gradient(width: int, height: int, horizontal: bool = True) -> Image.Image:
    """Grey value proportional to x (or y), so a crop's offset shows in its pixels."""
    ramp = np.linspace(0, 255, width if horizontal else height)
    grid = np.tile(ramp, (height, 1)) if horizontal else np.tile(ramp[:, None], (1, width))
    return Image.fromarray(np.rint(grid).astype(np.uint8), "L").convert("RGB")


@pytest.mark.parametrize(
    "size, bucket, crop",
    [
        ((300, 200), (192, 128), (0, 0)),  # same ratio: resize only
        ((300, 100), (128, 64), (0, 32)),  # wider: match heights, crop the sides
        ((100, 300), (64, 128), (32, 0)),  # taller: match widths, crop top and bottom
        ((333, 100), (128, 64), (0, 42)),  # odd overhang: the extra column goes right
        ((50, 40), (128, 128), (0, 16)),  # enlarged
        ((128, 64), (128, 64), (0, 0)),  # already the bucket's size
    ],
)
def test_fit_to_bucket_sizes_and_crop(size, bucket, crop):
    out, crop_top_left, original = fit_to_bucket(gradient(*size), bucket)
    assert out.size == bucket
    assert crop_top_left == crop
    assert original == (size[1], size[0])


def test_reported_crop_is_the_crop_done():
    img = gradient(400, 100)  # value = 255 * x / 399
    out, (top, left), _ = fit_to_bucket(img, (128, 64))  # resized to 256x64, so left = 64
    assert (top, left) == (0, 64)
    scale = 256 / 400
    first_column_source_x = (left + 0.5) / scale - 0.5
    assert np.asarray(out)[32, 0, 0] == pytest.approx(255 * first_column_source_x / 399, abs=1.5)
    tall = gradient(100, 400, horizontal=False)
    out, (top, left), _ = fit_to_bucket(tall, (64, 128))
    assert (top, left) == (64, 0)
    assert np.asarray(out)[0, 32, 0] == pytest.approx(255 * ((top + 0.5) / (256 / 400) - 0.5) / 399, abs=1.5)


def test_filters_area_when_shrinking_lanczos_when_enlarging():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    shrunk, _, _ = fit_to_bucket(noisy, (64, 48))
    assert np.array_equal(np.asarray(shrunk), np.asarray(noisy.resize((64, 48), Image.Resampling.BOX)))
    grown, _, _ = fit_to_bucket(noisy, (192, 128))  # covers at 192x144, crops 8 rows top and bottom
    expected = noisy.resize((192, 144), Image.Resampling.LANCZOS).crop((0, 8, 192, 136))
    assert np.array_equal(np.asarray(grown), np.asarray(expected))
