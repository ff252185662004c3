"""The engine's scan fuzzed with hostile datasets (hypothesis): broken and hostile images, odd
names, binary captions, things that are not files. Whatever the folder holds, the scan ends in
a Dataset (or one UserError when nothing is usable), every candidate file is either an item or
skipped with its reason, and every item decodes cleanly. Then a folder of 10,000 files, timed."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hostile import KINDS, write_kind
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loradrop.engine.data.dataset import scan
from loradrop.engine.data.images import BadImage, load_rgb
from loradrop.engine.recipe import Recipe
from loradrop.errors import UserError

RECIPE = Recipe.from_mapping(
    {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 32}
)

# Names: spaces, accents, CJK, emoji, newlines and tabs, and the ones no UTF-8 can spell.
_ALPHABET = st.sampled_from(list("abcXYZ019 _-.,'()[]&é漢字🙂\n\t\r"))
_STEMS = st.one_of(
    st.text(_ALPHABET, min_size=1, max_size=30),
    st.just("L" * 200),  # long: 200 bytes + suffix, near the file system's 255
    st.just("🙂" * 50),  # 200 bytes of 4-byte characters
    st.binary(min_size=1, max_size=12).map(
        lambda b: b"\xff" + b.replace(b"/", b"_").replace(b"\0", b"_")
    ),  # not UTF-8
)
_CAPTIONS = st.one_of(
    st.just(b"a photo of zkw thing, red, outdoors"),
    st.just(b""),
    st.just("\ufeffzkw, caf\u00e9\r\nsecond line".encode()),
    st.binary(max_size=64).map(lambda b: b"\xff" + b),  # binary: never UTF-8
    st.none(),  # no caption file at all
)
_ENTRIES = st.lists(
    st.tuples(_STEMS, st.sampled_from(sorted(KINDS)), _CAPTIONS, st.integers(0, 10_000)),
    min_size=1,
    max_size=8,
)
_EXTRAS = st.sets(st.sampled_from(["dir_named_png", "dangling_link", "link_out", "nested", "hidden"]))


def _decoded(stem) -> str:
    return os.fsdecode(stem) if isinstance(stem, bytes) else stem


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=_ENTRIES, extras=_EXTRAS)
def test_scan_sorts_every_hostile_file_into_items_or_skipped(entries, extras):
    folder = Path(tempfile.mkdtemp(prefix="ldh-"))
    outside = Path(tempfile.mkdtemp(prefix="ldo-"))
    try:
        expected: dict[Path, tuple[str, str]] = {}
        seen_stems: set[str] = set()
        for stem, kind, caption, seed in entries:
            key = _decoded(stem) + KINDS[kind].suffix
            if _decoded(stem) in seen_stems or _decoded(stem).startswith("."):
                continue
            seen_stems.add(_decoded(stem))
            path = write_kind(folder, stem, kind, seed, caption)
            if caption is None:
                expected[path] = ("skipped", "no caption file")
            elif caption.startswith(b"\xff"):
                expected[path] = ("skipped", "caption not UTF-8")
            else:
                expected[path] = (KINDS[kind].expect, KINDS[kind].reason)
            assert path.name == key
        if "dir_named_png" in extras:
            (folder / "folder.png").mkdir()
            expected[folder / "folder.png"] = ("skipped", "not a regular file")
        if "dangling_link" in extras:
            (folder / "dangling.png").symlink_to(outside / "gone.png")
            (folder / "dangling.txt").write_text("zkw")
            expected[folder / "dangling.png"] = ("skipped", "cannot be read")
        if "link_out" in extras:  # the engine follows links; the daemon refuses links out of its inbox
            target = write_kind(outside, "target", "png", 1)
            (folder / "linked.png").symlink_to(target)
            (folder / "linked.txt").write_text("zkw")
            expected[folder / "linked.png"] = ("item", "")
        if "nested" in extras:  # subfolders are not searched
            (folder / "sub").mkdir()
            write_kind(folder / "sub", "inner", "png", 2)
        if "hidden" in extras:  # editors' and macOS's hidden files are never candidates
            write_kind(folder, "._ghost", "garbage", 3)

        try:
            dataset = scan(folder, RECIPE)
        except UserError as e:  # only when nothing is usable, and then it says so in one sentence
            assert not any(what == "item" for what, _ in expected.values()), (
                f"a usable image was refused: {e}"
            )
            return
        items = {item.path: item for item in dataset.items}
        skipped = dict(dataset.skipped)
        assert not items.keys() & skipped.keys()
        assert items.keys() | skipped.keys() == expected.keys(), (
            "every candidate is an item or skipped, nothing else"
        )
        for path, (what, reason) in expected.items():
            if what == "item":
                assert path in items, f"{path.name!r} should train, but was skipped: {skipped.get(path)}"
            elif what == "skipped":
                assert path in skipped and reason in skipped[path], (
                    f"{path.name!r}: expected skipped for {reason!r}, got {skipped.get(path, 'an item')}"
                )
            assert skipped.get(path, "reason") != "", "a skipped file always has a reason"
        for path, item in items.items():
            try:
                image = load_rgb(path)
            except BadImage:
                assert expected[path][0] == "either", f"{path.name!r} passed the scan but does not decode"
                continue
            assert image.mode == "RGB" and image.size == item.size
        if dataset.skipped:
            warning = dataset.skipped_warning()
            assert f"Skipped {len(skipped)} of {len(skipped) + len(items)}" in warning
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(outside, ignore_errors=True)


@pytest.mark.slow
def test_a_folder_of_ten_thousand_files_scans_in_seconds(tmp_path):
    """5,000 small PNGs and their 5,000 captions (a few of them broken): the scan reads headers
    only, in threads; it must stay far from minutes."""
    folder = tmp_path / "many"
    folder.mkdir()
    tiny = KINDS["png"].make(0)
    broken = tiny[: len(tiny) // 2]
    for i in range(5000):
        (folder / f"img{i:05d}.png").write_bytes(broken if i % 1000 == 7 else tiny)
        (folder / f"img{i:05d}.txt").write_text(f"zkw thing {i}")
    start = time.perf_counter()
    dataset = scan(folder, RECIPE)
    seconds = time.perf_counter() - start
    assert len(dataset.items) == 4995 and len(dataset.skipped) == 5
    assert all(why == "truncated" for _, why in dataset.skipped)
    assert seconds < 30, f"scanning 10,000 files took {seconds:.1f} s"
    print(f"scan of 10,000 files: {seconds:.2f} s")
