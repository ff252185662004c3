"""Dataset scanning (good and bad folders), captions, and per-epoch batches."""

from __future__ import annotations

import io
import os
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from loradrop.engine.data.buckets import make_buckets, pick_bucket
from loradrop.engine.data.captions import BadCaption, process_caption, read_caption, shuffle_caption
from loradrop.engine.data.dataset import Item, epoch_batches, scan
from loradrop.engine.recipe import Recipe
from loradrop.errors import UserError

RECIPE = Recipe()


def write_image(path, size=(96, 64), fmt=None, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)
    return path


def write_pair(folder, stem, size=(96, 64), ext=".png", caption="a photo, red, outdoors"):
    image = write_image(folder / f"{stem}{ext}", size)
    (folder / f"{stem}.txt").write_text(caption + "\nsecond line ignored\n", encoding="utf-8")
    return image


def bomb_png() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------ captions


def test_read_caption(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\ufeff  a cat, sitting \r\nsecond".encode("utf-8"))
    assert read_caption(path) == "a cat, sitting"
    path.write_bytes(b"only\rold mac line ending")
    assert read_caption(path) == "only"
    path.write_bytes(b"")
    assert read_caption(path) == ""
    path.write_bytes("caf\u00e9, na\u00efve".encode("utf-8"))
    assert read_caption(path) == "caf\u00e9, na\u00efve"


def test_process_caption_follows_kohyas_order():
    """kohya's process_caption: whole-caption dropout first; else shuffle the tags past
    keep_tokens, then drop each of those with caption_tag_dropout_rate."""
    caption = "me, a, b, c, d, e"
    for seed in range(30):
        mine = process_caption(
            caption, random.Random(seed), shuffle=True, keep_tokens=1, dropout_rate=0.3, tag_dropout_rate=0.5
        )
        rng = random.Random(seed)  # the same steps, written out as kohya does them
        if rng.random() < 0.3:
            expected = ""
        else:
            rest = ["a", "b", "c", "d", "e"]
            rng.shuffle(rest)
            expected = ", ".join(["me"] + [t for t in rest if rng.random() >= 0.5])
        assert mine == expected
    assert process_caption(caption, random.Random(0), shuffle=False, dropout_rate=1.0) == ""
    kept = {
        process_caption(caption, random.Random(s), shuffle=False, keep_tokens=2, tag_dropout_rate=1.0)
        for s in range(5)
    }
    assert kept == {"me, a"}  # kept tags are never dropped, and without shuffle the order stays
    assert process_caption(" as,written ", random.Random(0), shuffle=False) == " as,written "


def test_process_caption_without_rates_draws_as_before():
    """No dropout: the rng is used exactly as shuffle_caption used it, so old runs replay."""
    caption = "a, b, c, d, e, f"
    for seed in range(10):
        a, b = random.Random(seed), random.Random(seed)
        rest = ["c", "d", "e", "f"]
        b.shuffle(rest)  # what the loop did before the rates existed
        assert process_caption(caption, a, shuffle=True, keep_tokens=2) == ", ".join(["a", "b"] + rest)
        assert a.random() == b.random()


def test_caption_in_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(BadCaption) as e:
        read_caption(path)
    assert e.value.reason == "caption not UTF-8 (latin1.txt: byte 0xe9 at offset 3)"


def test_shuffle_caption():
    caption = "keep me, a, b,, c ,d, e, f, g, h"
    out = shuffle_caption(caption, random.Random(3), keep_tokens=1)
    tags = out.split(", ")
    assert tags[0] == "keep me"
    assert sorted(tags[1:]) == ["a", "b", "c", "d", "e", "f", "g", "h"]  # empty dropped, stripped
    assert out == shuffle_caption(caption, random.Random(3), keep_tokens=1)
    orders = {shuffle_caption(caption, random.Random(s)) for s in range(20)}
    assert len(orders) > 10  # keep_tokens=0 moves the first tag too
    assert any(not o.startswith("keep me") for o in orders)
    assert shuffle_caption("solo", random.Random(0)) == "solo"
    assert shuffle_caption("", random.Random(0)) == ""


# ------------------------------------------------------------------ scanning


def test_scan_good_folder(tmp_path):
    write_pair(tmp_path, "b", (300, 200))
    write_pair(tmp_path, "a", (64, 256), ext=".JPG", caption="  first, tags ")
    write_pair(tmp_path, "c", (128, 128), ext=".webp")
    (tmp_path / "sample-prompts.txt").write_text("a prompt --w 512\n")
    (tmp_path / "loradrop.toml").write_text("max_train_steps = 10\n")
    (tmp_path / "notes.md").write_text("not data")
    (tmp_path / "orphan.txt").write_text("a caption without an image")
    write_image(tmp_path / ".hidden.png")
    (tmp_path / "sub").mkdir()
    write_pair(tmp_path / "sub", "deep")

    ds = scan(tmp_path, RECIPE)
    assert ds.skipped == []
    assert ds.skipped_warning() is None
    assert ds.orphans == ["orphan.txt"]  # sample-prompts.txt is not a caption
    assert (
        ds.orphan_warning()
        == f"{tmp_path} has caption files with no image of the same name (orphan.txt); they are not used."
    )
    assert [i.path.name for i in ds.items] == ["a.JPG", "b.png", "c.webp"]
    a, b, c = ds.items
    assert a.caption == "first, tags"
    assert b.caption == "a photo, red, outdoors"
    assert (a.size, b.size, c.size) == ((64, 256), (300, 200), (128, 128))
    buckets = make_buckets(1024, 256, 2048, 32)
    assert a.bucket == pick_bucket(64, 256, buckets) == (512, 2048)
    assert b.bucket == (1248, 832)
    assert c.bucket == (1024, 1024)


def test_scan_uses_upright_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (300, 100)).save(tmp_path / "r.jpg", exif=exif.tobytes())
    (tmp_path / "r.txt").write_text("rotated")
    (item,) = scan(tmp_path, RECIPE).items
    assert item.size == (100, 300)
    assert item.bucket[0] < item.bucket[1]


def test_scan_without_buckets_uses_the_square(tmp_path):
    write_pair(tmp_path, "wide", (300, 100))
    recipe = Recipe(enable_bucket=False, resolution=512)
    assert scan(tmp_path, recipe).items[0].bucket == (512, 512)


def test_scan_follows_the_recipes_bucket_settings(tmp_path):
    write_pair(tmp_path, "wide", (300, 100))
    recipe = Recipe(resolution=256, min_bucket_reso=64, max_bucket_reso=512, bucket_reso_steps=64)
    assert (
        scan(tmp_path, recipe).items[0].bucket
        == pick_bucket(300, 100, make_buckets(256, 64, 512, 64))
        == (384, 128)
    )


def make_bad_folder(folder):
    """Two good images and one of every bad kind; returns {file name: expected reason fragment}."""
    write_pair(folder, "good1")
    write_pair(folder, "good2", (200, 100), ext=".jpg")
    bad = {}

    (folder / "empty.png").write_bytes(b"")
    (folder / "empty.txt").write_text("x")
    bad["empty.png"] = "empty file"

    data = io.BytesIO()
    write_image(data, (200, 200), "PNG", seed=5)
    (folder / "cut.png").write_bytes(data.getvalue()[:3000])
    (folder / "cut.txt").write_text("x")
    bad["cut.png"] = "truncated"

    (folder / "noise.jpg").write_bytes(os.urandom(2048))
    (folder / "noise.txt").write_text("x")
    bad["noise.jpg"] = "not a PNG, JPEG or WebP image"

    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "bomb.txt").write_text("x")
    bad["bomb.png"] = "too large"

    write_image(folder / "latin.png")
    (folder / "latin.txt").write_bytes("caf\u00e9".encode("latin-1"))
    bad["latin.png"] = "caption not UTF-8 (latin.txt"

    write_image(folder / "alone.webp", fmt="WEBP")
    bad["alone.webp"] = "no caption file (alone.txt)"

    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "gone.txt").write_text("x")
    bad["gone.png"] = "cannot be read"

    (folder / "dir.png").mkdir()
    bad["dir.png"] = "not a regular file"
    return bad


def test_bad_files_are_skipped_and_listed_once(tmp_path):
    bad = make_bad_folder(tmp_path)
    ds = scan(tmp_path, RECIPE)
    assert [i.path.name for i in ds.items] == ["good1.png", "good2.jpg"]
    reasons = {p.name: why for p, why in ds.skipped}
    assert set(reasons) == set(bad)
    for name, fragment in bad.items():
        assert fragment in reasons[name], (name, reasons[name])
    warning = ds.skipped_warning()
    assert warning.startswith(f"Skipped {len(bad)} of {len(bad) + 2} images in {tmp_path}:")
    assert "\n" not in warning
    for name in bad:
        assert name in warning


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_image_and_caption(tmp_path):
    write_pair(tmp_path, "good")
    locked_image = write_pair(tmp_path, "locked")
    write_pair(tmp_path, "lockedcap")
    locked_caption = tmp_path / "lockedcap.txt"
    locked_image.chmod(0)
    locked_caption.chmod(0)
    try:
        ds = scan(tmp_path, RECIPE)
    finally:
        locked_image.chmod(0o644)
        locked_caption.chmod(0o644)
    reasons = {p.name: why for p, why in ds.skipped}
    assert reasons["locked.png"].startswith("cannot be read")
    assert reasons["lockedcap.png"].startswith("caption cannot be read (lockedcap.txt")


def test_warning_counts_the_rest_after_twenty(tmp_path):
    write_pair(tmp_path, "good")
    for i in range(25):
        (tmp_path / f"bad{i:02d}.png").write_bytes(b"")
        (tmp_path / f"bad{i:02d}.txt").write_text("x")
    warning = scan(tmp_path, RECIPE).skipped_warning()
    assert "bad19.png: empty file;" in warning and "bad20.png" not in warning
    assert warning.endswith("; and 5 more (5 empty file).")


def test_empty_folder(tmp_path):
    with pytest.raises(UserError) as e:
        scan(tmp_path, RECIPE)
    assert str(tmp_path) in str(e.value) and "has no PNG, JPEG or WebP images" in str(e.value)


def test_folder_without_images(tmp_path):
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "sample-prompts.txt").write_text("prompt")
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError) as e:
        scan(tmp_path, RECIPE)
    assert str(tmp_path) in str(e.value) and "subfolders are not searched" in str(e.value)


def test_all_bad(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("x")
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "c.png")
    with pytest.raises(UserError) as e:
        scan(tmp_path, RECIPE)
    message = str(e.value)
    assert str(tmp_path) in message
    assert "all 3 were skipped" in message
    assert "2 no caption file" in message and "1 empty file" in message


def test_kohya_folders_repeat_n_times_and_caption_by_name(tmp_path):
    """kohya's layout: `N_name/` trains N times per epoch, an image without a caption file takes
    the name's class tokens; other subfolders (and N < 1) are ignored, and named."""
    write_pair(tmp_path, "top")  # the folder's own images: dataset_repeats
    for sub in ("10_cats", "3_my_char", "0_zero", "notes", "empty_words"):
        (tmp_path / sub).mkdir()
    write_pair(tmp_path / "10_cats", "a")
    write_pair(tmp_path / "10_cats", "b", ext=".jpg")
    write_image(tmp_path / "3_my_char" / "c.png")  # no caption file: kohya captions it "my_char"
    (tmp_path / "3_my_char" / "d.png").write_bytes(b"")  # skipped, and counted in its subfolder
    write_pair(tmp_path / "0_zero", "z")
    write_pair(tmp_path / "notes", "n")
    (tmp_path / "empty_words" / "readme.txt").write_text("no images here")
    ds = scan(tmp_path, RECIPE.updated({"dataset_repeats": 2}))
    by_name = {i.path.name: i for i in ds.items}
    assert sorted(by_name) == ["a.png", "b.jpg", "c.png", "top.png"]
    assert [(by_name[n].repeats, by_name[n].subset) for n in ("top.png", "a.png", "c.png")] == [
        (2, ""),
        (10, "10_cats"),
        (3, "3_my_char"),
    ]
    assert by_name["c.png"].caption == "my_char" and by_name["a.png"].caption == "a photo, red, outdoors"
    # kohya's per-epoch count: sum of images x num_repeats; the loop lists each item `repeats` times
    assert (
        ds.images_per_epoch
        == 1 * 2 + 2 * 10 + 1 * 3
        == len([i for i, item in enumerate(ds.items) for _ in range(item.repeats)])
    )
    assert ds.scan_report() == [
        f"{tmp_path}: 4 images, 25 per epoch, from 3 folders (kohya's N_name layout)",
        "  the folder's own images: 1 image x 2 repeats = 2 per epoch, 0 skipped",
        "  10_cats/: 2 images x 10 repeats = 20 per epoch, 0 skipped",
        "  3_my_char/: 1 image x 3 repeats = 3 per epoch, 1 skipped, 1 without a caption file captioned 'my_char' (from the folder name)",
    ]
    assert ds.subfolders == ["0_zero", "notes"] and "(0_zero/, notes/)" in ds.subfolder_warning()
    assert "3_my_char/d.png: empty file" in ds.skipped_warning()


def test_a_flat_folder_has_no_kohya_report_and_keeps_its_captions_rule(tmp_path):
    write_pair(tmp_path, "top")
    write_image(tmp_path / "uncaptioned.png")
    ds = scan(tmp_path, RECIPE)
    assert ds.scan_report() == [] and ds.subfolder_warning() is None
    assert [i.repeats for i in ds.items] == [1] and "no caption file" in ds.skipped_warning()


def test_kohya_folders_alone_and_empty(tmp_path):
    (tmp_path / "5_cats").mkdir()
    with pytest.raises(UserError) as e:
        scan(tmp_path, RECIPE)
    assert (
        str(e.value)
        == f"{tmp_path} and its N_name subfolders have no PNG, JPEG or WebP images; put images in them."
    )
    write_image(tmp_path / "5_cats" / "a.png")  # no caption, no top-level images: trains as "cats"
    ds = scan(tmp_path, RECIPE)
    assert [(i.caption, i.repeats) for i in ds.items] == [("cats", 5)]
    (tmp_path / "2_").mkdir()
    write_image(tmp_path / "2_" / "b.png")  # kohya's `2_`: no class tokens, the empty caption
    ds = scan(tmp_path, RECIPE)
    assert [(i.caption, i.repeats) for i in ds.items] == [("", 2), ("cats", 5)]  # subfolders in name order
    assert (
        ds.scan_report()[1]
        == "  2_/: 1 image x 2 repeats = 2 per epoch, 0 skipped, 1 without a caption file trained on the empty caption (the folder name has no class tokens)"
    )


def test_a_regularization_folder_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "10_me").mkdir()
    write_pair(tmp_path / "10_me", "a")
    (tmp_path / "reg" / "1_woman").mkdir(parents=True)
    write_pair(tmp_path / "reg" / "1_woman", "w")
    with pytest.raises(UserError) as e:
        scan(tmp_path, RECIPE)
    assert str(e.value) == (
        f"{tmp_path / 'reg'} looks like a kohya regularization set, which loradrop does not train with "
        "(no prior loss); move reg/ out of the dataset folder."
    )


def test_a_huge_n_is_refused_naming_the_subfolder(tmp_path):
    (tmp_path / "20000000_x").mkdir()
    write_pair(tmp_path / "20000000_x", "a")
    with pytest.raises(UserError) as e:
        scan(tmp_path, RECIPE)
    assert "20000000_x/ repeats 20000000 times" in str(
        e.value
    ) and "rename 20000000_x/ with a smaller N" in str(e.value)


def test_an_image_in_a_kohya_folder_is_followed_when_the_dataset_folder_is_renamed(tmp_path):
    root = tmp_path / "data"
    (root / "2_x").mkdir(parents=True)
    write_pair(root / "2_x", "a")
    item = scan(root, RECIPE).items[0]
    root.rename(tmp_path / "moved")
    assert item.current_path() == tmp_path / "moved" / "2_x" / "a.png"


def test_a_caption_file_of_gigabytes_is_skipped_not_read(tmp_path):
    """A 64 GB sparse caption file made the scan fail with a bare MemoryError."""
    write_pair(tmp_path, "good")
    write_image(tmp_path / "huge.png")
    with open(tmp_path / "huge.txt", "wb") as f:
        f.truncate(64 << 30)  # sparse: no disk used
    ds = scan(tmp_path, RECIPE)
    assert [i.path.name for i in ds.items] == ["good.png"]
    assert ds.skipped == [
        (tmp_path / "huge.png", "caption file too large (huge.txt: 68,719,476,736 bytes; at most 1 MB)")
    ]


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan(tmp_path / "nope", RECIPE)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is not a folder"):
        scan(tmp_path / "file", RECIPE)


# ------------------------------------------------------------------ batches


def items_in(buckets: list[tuple[int, int]]) -> list[Item]:
    return [Item(path=f"{i}.png", caption="", size=b, bucket=b) for i, b in enumerate(buckets)]


BUCKETS = [(1024, 1024)] * 11 + [(832, 1216)] * 5 + [(1216, 832)] * 2 + [(1344, 768)]


def test_epoch_batches_are_pure_and_never_mix_buckets():
    items = items_in(BUCKETS)
    batches = epoch_batches(items, 4, seed=42, epoch=0)
    assert batches == epoch_batches(items, 4, seed=42, epoch=0)
    assert batches == epoch_batches(BUCKETS, 4, seed=42, epoch=0)  # buckets alone give the same
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    for batch in batches:
        assert len({items[i].bucket for i in batch}) == 1
        assert 1 <= len(batch) <= 4
    # Per bucket: ceil(n / 4) batches, only the last one short.
    sizes = sorted(len(b) for b in batches)
    assert sizes == sorted([4, 4, 3, 4, 1, 2, 1])


def test_epoch_batches_change_with_epoch_and_seed():
    items = items_in(BUCKETS)
    first = epoch_batches(items, 4, seed=42, epoch=0)
    assert epoch_batches(items, 4, seed=42, epoch=1) != first
    assert epoch_batches(items, 4, seed=7, epoch=0) != first
    # seed + epoch is the whole state, as in kohya
    assert epoch_batches(items, 4, seed=41, epoch=1) == first


def test_epoch_batches_batch_size_one_and_large():
    items = items_in(BUCKETS)
    assert sorted(len(b) for b in epoch_batches(items, 1, 0, 0)) == [1] * len(items)
    assert sorted(len(b) for b in epoch_batches(items, 100, 0, 0)) == [1, 2, 5, 11]
    with pytest.raises(ValueError):
        epoch_batches(items, 0, 0, 0)
