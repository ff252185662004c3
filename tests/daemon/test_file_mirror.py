"""The chunked file path between the daemon's home and a Ray node's copy (daemon/file_mirror.py),
and the path swap of the messages that go with it (daemon/ray_slot.PathMap), on real files."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from loradrop.daemon import file_mirror
from loradrop.daemon.file_mirror import FileChunk, Receiver, Stamp, Watcher, chunks, files_under, inside
from loradrop.daemon.ray_slot import PathMap
from loradrop.engine.jobspec import JobSpec

SMALL = 1000  # bytes per chunk in these tests, so a small file has many


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(file_mirror, "CHUNK", SMALL)


def _file(path: Path, size: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.partial")]


def test_a_file_arrives_whole_with_its_stamp_whatever_the_order_of_its_chunks(tmp_path):
    source = _file(tmp_path / "a" / "ckpt.safetensors", 10 * SMALL + 7)
    sent = list(chunks(source, "outputs/j1/ckpt.safetensors"))
    assert len(sent) == 11
    random.Random(3).shuffle(sent)
    receiver = Receiver(tmp_path / "b")
    done = [receiver.take(c) for c in sent]
    target = tmp_path / "b" / "outputs" / "j1" / "ckpt.safetensors"
    assert done[:-1] == [None] * 10 and done[-1] == target, "complete only with its last chunk"
    assert target.read_bytes() == source.read_bytes()
    assert Stamp.of(target) == Stamp.of(source), "the copy stamps the same, so it is not sent again"
    assert _partials(tmp_path / "b") == []


def test_chunks_from_many_threads_at_once_make_whole_files(tmp_path):
    sources = [_file(tmp_path / "a" / f"f{i}.bin", 5 * SMALL + i, seed=i) for i in range(6)]
    sent = [c for s in sources for c in chunks(s, f"x/{s.name}")]
    random.Random(1).shuffle(sent)
    receiver = Receiver(tmp_path / "b")
    threads = [
        threading.Thread(target=lambda part: [receiver.take(c) for c in part], args=(sent[i::4],))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sources:
        assert (tmp_path / "b" / "x" / s.name).read_bytes() == s.read_bytes()
    assert _partials(tmp_path / "b") == []


def test_a_file_is_never_seen_half_written(tmp_path):
    source = _file(tmp_path / "a.bin", 3 * SMALL)
    receiver = Receiver(tmp_path / "b")
    first, *rest = chunks(source, "a.bin")
    receiver.take(first)
    assert not (tmp_path / "b" / "a.bin").exists()
    assert files_under(tmp_path / "b", tmp_path / "b") == [], "the temporary file is not listed"
    for c in rest:
        receiver.take(c)
    assert files_under(tmp_path / "b", tmp_path / "b") == ["a.bin"]


def test_a_file_sent_again_after_it_changed_starts_over_and_late_chunks_of_the_old_one_lose(tmp_path):
    source = _file(tmp_path / "a.bin", 4 * SMALL, seed=1)
    old = list(chunks(source, "a.bin"))
    source.write_bytes(random.Random(2).randbytes(3 * SMALL))
    os.utime(source, ns=(old[0].stamp.mtime_ns + 10**9,) * 2)
    new = list(chunks(source, "a.bin"))
    receiver = Receiver(tmp_path / "b")
    receiver.take(old[0])
    for c in new[:2]:
        receiver.take(c)
    assert receiver.take(old[1]) is None, "a late chunk of the replaced version is dropped"
    assert receiver.take(new[2]) == tmp_path / "b" / "a.bin"
    assert (tmp_path / "b" / "a.bin").read_bytes() == source.read_bytes()
    for c in old[2:]:
        receiver.take(c)
    assert (tmp_path / "b" / "a.bin").read_bytes() == source.read_bytes()
    assert _partials(tmp_path / "b") == [], "the old version left no temporary file"


def test_an_empty_file_is_one_chunk(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (only,) = chunks(tmp_path / "empty", "empty")
    assert Receiver(tmp_path / "b").take(only) == tmp_path / "b" / "empty"
    assert (tmp_path / "b" / "empty").read_bytes() == b""


def test_a_file_still_growing_is_sent_as_it_was_when_opened(tmp_path):
    source = _file(tmp_path / "log", 2 * SMALL)
    it = chunks(source, "log")
    first = next(it)
    with open(source, "ab") as f:
        f.write(b"more")
    rest = list(it)
    assert sum(len(c.data) for c in [first, *rest]) == 2 * SMALL
    assert {c.stamp for c in rest} == {first.stamp}


def test_a_transfer_cut_off_leaves_only_a_partial_file_that_close_removes(tmp_path):
    receiver = Receiver(tmp_path / "b")
    receiver.take(next(chunks(_file(tmp_path / "a.bin", 3 * SMALL), "a.bin")))
    assert len(_partials(tmp_path / "b")) == 1
    receiver.close()
    assert _partials(tmp_path / "b") == [] and not (tmp_path / "b" / "a.bin").exists()


@pytest.mark.parametrize("rel", ["../escape", "a/../../escape", "/etc/passwd", "", "a/../../../b"])
def test_a_name_that_leads_out_of_the_folder_is_refused(tmp_path, rel):
    with pytest.raises(ValueError, match="leads out of its folder"):
        inside(tmp_path, rel)
    evil = FileChunk(rel, 0, b"x", Stamp(1, 1))
    with pytest.raises(ValueError):
        Receiver(tmp_path / "b").take(evil)
    assert not (tmp_path / "escape").exists()


def test_the_watcher_names_each_new_or_changed_file_once(tmp_path):
    out = tmp_path / "outputs"
    watcher = Watcher(tmp_path, out)
    _file(out / "j1" / "a.safetensors", 10)
    _file(out / "j1" / ".b.safetensors.1.x.partial", 10)
    assert watcher.changed() == ["outputs/j1/a.safetensors"]
    assert watcher.changed() == []
    _file(out / "j1" / "a.safetensors", 12, seed=5)
    assert watcher.changed() == ["outputs/j1/a.safetensors"]
    received = _file(out / "j2" / "ckpt", 5)
    watcher.know("outputs/j2/ckpt", Stamp.of(received))
    assert watcher.changed() == [], "a file that came from the daemon is not sent back"
    watcher.forget("outputs/j1/")
    assert watcher.changed() == ["outputs/j1/a.safetensors"]


def test_the_path_map_swaps_the_home_in_nested_records_and_back():
    paths = PathMap({"/srv/home": "/scratch/copy", "/models": "/scratch/copy/outside/ab12"})
    spec = JobSpec(
        "j1",
        "cat",
        Path("/srv/home/inbox/cat"),
        Path("/srv/home/outputs/j1"),
        {"unet_lr": 1.0},
        model="/models/base",
    )
    there = paths.there(spec)
    assert there.dataset == Path("/scratch/copy/inbox/cat") and there.out_dir == Path(
        "/scratch/copy/outputs/j1"
    )
    assert there.model == "/scratch/copy/outside/ab12/base"
    assert paths.back(there) == spec
    assert paths.there("cannot read /srv/home/inbox/cat/1.png: truncated") == (
        "cannot read /scratch/copy/inbox/cat/1.png: truncated"
    )
    assert paths.there(["/models/base.safetensors", {"k": "/srv/home"}]) == [
        "/scratch/copy/outside/ab12/base.safetensors",
        {"k": "/scratch/copy"},
    ]


def test_the_path_map_leaves_a_name_that_only_begins_like_the_home():
    paths = PathMap({"/srv/home": "/scratch/copy"})
    assert paths.there("/srv/home2/x and /srv/homework") == "/srv/home2/x and /srv/homework"
    assert paths.there("'/srv/home' (/srv/home)") == "'/scratch/copy' (/scratch/copy)"
