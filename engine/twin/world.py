"""The twin's world: one flat shape of one saturated colour on a plain grey-scale background.

Every picture is a pure function of a seed, so the world is the same on every machine. Shapes
are drawn at 4x and box-filtered down, so edges are anti-aliased as a photograph's would be.
The base twin learns `BASE_COLOURS`; `NOVEL_COLOURS` never appear in its training, so a LoRA that
draws one has learned something the base could not do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64  # pixels; SDXL's VAE makes that an 8x8 latent
_SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (230, 210, 20),
    "green": (30, 180, 40),
    "cyan": (20, 200, 210),
    "blue": (30, 60, 220),
    "magenta": (210, 40, 200),
}
BASE_COLOURS = ("red", "yellow", "green", "blue")
NOVEL_COLOURS = ("cyan", "magenta")
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}


@dataclass(frozen=True)
class Scene:
    """What a picture shows; `caption` is how the world describes it."""

    colour: str
    shape: str
    background: str
    cx: float  # centre and half-size, in pixels of the SIZE x SIZE picture
    cy: float
    r: float

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def random_scene(rng: random.Random, colours: tuple[str, ...] = BASE_COLOURS) -> Scene:
    r = rng.uniform(12, 20)
    margin = r + 3
    return Scene(
        colour=rng.choice(colours),
        shape=rng.choice(SHAPES),
        background=rng.choice(sorted(BACKGROUNDS)),
        cx=rng.uniform(margin, SIZE - margin),
        cy=rng.uniform(margin, SIZE - margin),
        r=r,
    )


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    k = _SUPERSAMPLE * size / SIZE
    img = Image.new("RGB", (round(size * _SUPERSAMPLE),) * 2, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    x, y, r, fill = scene.cx * k, scene.cy * k, scene.r * k, COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:  # upright isosceles: as wide as it is tall, so it fills half its box
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def scenes(count: int, seed: int, colours: tuple[str, ...] = BASE_COLOURS) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng, colours) for _ in range(count)]


def write_dataset(folder: str | Path, scenes_: list[Scene], *, caption_of=None) -> Path:
    """A dataset folder as a user drops one: PNGs with same-stem .txt captions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes_):
        render(scene).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text((caption_of or (lambda s: s.caption))(scene) + "\n")
    return folder
