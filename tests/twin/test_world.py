"""The twin's world and its judge: deterministic pictures, and a judge that reads them right."""

from __future__ import annotations

import numpy as np
from PIL import Image

from loradrop.engine.twin import judge, world


def test_the_world_is_a_pure_function_of_its_seed():
    a, b = world.scenes(20, seed=3), world.scenes(20, seed=3)
    assert a == b and a != world.scenes(20, seed=4)
    assert np.array_equal(np.asarray(world.render(a[0])), np.asarray(world.render(b[0])))
    assert a[0].caption == f"a {a[0].colour} {a[0].shape} on a {a[0].background} background"


def test_the_judge_reads_colour_shape_and_background_of_the_worlds_pictures():
    scenes = world.scenes(600, seed=2024, colours=world.BASE_COLOURS + world.NOVEL_COLOURS)
    verdicts = [judge.judge(world.render(s)) for s in scenes]
    right = sum(
        (v.colour, v.shape, v.background) == (s.colour, s.shape, s.background)
        for v, s in zip(verdicts, scenes)
    )
    assert right / len(scenes) >= 0.98, f"{right}/{len(scenes)}"


def test_the_judge_sees_no_shape_in_a_plain_picture_and_no_colour_in_a_grey_one():
    assert judge.judge(Image.new("RGB", (64, 64), (245, 245, 245))).colour is None
    grey = world.render(world.Scene("red", "square", "black", 32, 32, 16)).convert("L").convert("RGB")
    verdict = judge.judge(grey)
    assert verdict.shape == "square" and verdict.colour is None


def test_dataset_folders_hold_pictures_with_same_stem_captions(tmp_path):
    folder = world.write_dataset(tmp_path / "ds", world.scenes(3, seed=1))
    assert sorted(p.name for p in folder.iterdir()) == [
        "000.png",
        "000.txt",
        "001.png",
        "001.txt",
        "002.png",
        "002.txt",
    ]
    assert (folder / "000.txt").read_text().startswith("a ")
