"""A classical judge of the twin's world: which colour, which shape, on which background.

No learned model, so it cannot share a blind spot with the twin. The background is the median of
the picture's border; the foreground is every pixel far from it. Colour is the nearest world hue
to the foreground's median (if it is saturated enough to have one); shape is how much of its
bounding box the foreground fills: a square all of it, a circle pi/4, the upright triangle half.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import BACKGROUNDS, COLOURS

_FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as drawn
_MIN_AREA = 0.03  # of the picture: less than this is no shape at all
_MIN_SATURATION = 0.35
_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}


@dataclass(frozen=True)
class Verdict:
    colour: str | None  # None: nothing drawn, or nothing with a hue
    shape: str | None
    background: str
    fill: float  # foreground share of its bounding box
    area: float  # foreground share of the picture


def judge(image: Image.Image) -> Verdict:
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda name: float(np.abs(np.array(BACKGROUNDS[name]) - bg).sum()))
    mask = np.linalg.norm(px - bg, axis=-1) > _FOREGROUND_DISTANCE
    area = float(mask.mean())
    if area < _MIN_AREA:
        return Verdict(None, None, background, 0.0, area)
    fill = _fill(mask)
    return Verdict(_colour(px[mask]), _shape(fill), background, fill, area)


def _fill(mask: np.ndarray) -> float:
    # The box from the 1st to the 99th percentile of the foreground: a few stray pixels of a
    # sampled picture must not double the box.
    ys, xs = np.nonzero(mask)
    y0, y1 = np.percentile(ys, [1, 99])
    x0, x1 = np.percentile(xs, [1, 99])
    box = (y1 - y0 + 1) * (x1 - x0 + 1)
    inside = mask[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1].sum()
    return float(inside / box)


def _shape(fill: float) -> str:
    if fill > 0.94:
        return "square"
    if fill > 0.70:
        return "circle"
    return "triangle"


def _colour(pixels: np.ndarray) -> str | None:
    r, g, b = (np.median(pixels, axis=0) / 255).tolist()
    hue, saturation, _ = colorsys.rgb_to_hsv(r, g, b)
    if saturation < _MIN_SATURATION:
        return None
    return min(_HUES, key=lambda name: min(abs(hue - _HUES[name]), 1 - abs(hue - _HUES[name])))
