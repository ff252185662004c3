"""Hostile drops into a real daemon's inbox, all at once: symlink loops, a folder nested 1,500
deep, names that are not UTF-8, newlines and emoji in names, links out of the inbox, images only
in subfolders, a dataset full of broken files. The daemon stays up and answers, every folder
that holds anything ends as a job (done, or failed with its reason), every bad file is named in
a warning, the good images train, and the log does not fill up with one error repeated."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from hostile import KINDS, write_kind

from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.testing import make_dataset, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ENV = {"OMP_NUM_THREADS": "1"}
QUICK = {"max_train_steps": 2, "save_every_n_steps": 0, "resize_recipe": ""}
BAD_KINDS = [k for k, kind in KINDS.items() if kind.expect == "skipped"]


def _nest(folder: Path, depth: int) -> None:
    """`depth` folders, one in the other, made relative to each other (the full path would pass PATH_MAX)."""
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def test_hostile_drops_are_each_judged_and_the_good_ones_train(home, daemons, tmp_path):
    d = daemons(home, "--workers", "1", "--quiet-seconds", "0.5", env=ENV)
    inbox = home / "inbox"
    staging = tmp_path / "staging"
    staging.mkdir()

    # Broken files with hostile names beside three good images: the job trains on the good ones.
    mixed = make_dataset(staging / "mixed", images=3, settings=QUICK)
    for i, kind in enumerate(BAD_KINDS):
        stem = b"bad\xff" + str(i).encode() if i % 2 else f"bad {i} \u00e9\n\U0001f642"
        write_kind(mixed, stem, kind, seed=i)
    (mixed / "img9.png").write_bytes(KINDS["png"].make(9))
    (mixed / "img9.txt").write_bytes(b"\xff\xfebinary caption")
    bad_files = len(BAD_KINDS) + 1

    make_dataset(staging / "caf\u00e9 \U0001f642 new\nline", settings=QUICK)
    make_dataset(staging / ("L" * 240), settings=QUICK)
    nested = staging / "nested"
    make_dataset(nested / "sub", settings=QUICK)
    linked = make_dataset(staging / "linked", settings=QUICK)
    (linked / "secret.txt").symlink_to("/etc/hostname")
    looped = make_dataset(staging / "looped", settings=QUICK)
    (looped / "self").symlink_to(looped / "self")
    non_utf8 = os.path.join(os.fsencode(staging), b"not-utf8-\xff\xfe")
    make_dataset(Path(os.fsdecode(non_utf8)), settings=QUICK)
    _nest(staging / "deep", 1500)
    (staging / "deep" / "readme.txt").write_text(
        "the images are further down"
    )  # a folder with no file never starts

    (inbox / "loop").symlink_to(inbox / "loop")  # a symlink loop at the top of the inbox
    (inbox / "empty").mkdir()  # never starts
    (inbox / "stray-file.txt").write_text("not a folder")
    os.mkfifo(inbox / "fifo")
    for entry in os.listdir(os.fsencode(staging)):
        shutil.move(os.path.join(os.fsencode(staging), entry), os.path.join(os.fsencode(inbox), entry))
    good = {"mixed", "caf\u00e9 \U0001f642 new\nline", "L" * 240}
    refused = {
        "linked": "symlinks pointing outside the inbox",
        "looped": "symlink",
        "loop": "symlink",
        os.fsdecode(b"not-utf8-\xff\xfe"): "not valid UTF-8",
        "deep": "subfolders are not searched",
        "nested": "subfolders are not searched",
    }

    with d.client() as c:

        def judged():
            status = c.status()  # answers all along, also while folders with odd names wait
            assert status.pid == d.pid
            jobs = c.jobs()
            return (
                len(jobs) == len(good) + len(refused)
                and all(j.state in (pb.DONE, pb.FAILED) for j in jobs)
                and jobs
            )

        jobs = wait_for(judged, timeout=200, interval=0.3, what="every folder to end as a job")
        by_folder = {}
        for job in jobs:
            name = Path(job.dataset).name
            by_folder[next((f for f in [*good, *refused] if _same(f, name)), name)] = job
        assert by_folder.keys() == good | refused.keys(), sorted(by_folder)
        for folder in good:
            assert by_folder[folder].state == pb.DONE, (folder, by_folder[folder].error)
        for folder, reason in refused.items():
            job = by_folder[folder]
            assert job.state == pb.FAILED and job.error and reason in job.error, (folder, job.error)
        assert "empty" in c.status().pending_folders

        events = list(c.events(follow=False))  # every stored event, each one sendable
        assert [e.global_seq for e in events] == list(range(1, len(events) + 1))
        warnings = [
            e.log.text
            for e in c.events(by_folder["mixed"].id, follow=False)
            if e.HasField("log") and e.log.level == "warning"
        ]
        skipped = next(w for w in warnings if w.startswith("Skipped"))
        assert f"Skipped {bad_files} of {bad_files + 3}" in skipped
        assert "img9.png: caption not UTF-8" in skipped
        for i in range(len(BAD_KINDS)):
            assert (f"bad\ufffd{i}" if i % 2 else f"bad {i} \u00e9\n\U0001f642") in skipped, i

        # After all that, the inbox still takes a new folder.
        shutil.move(make_dataset(tmp_path / "after", settings=QUICK), inbox / "after")
        after = wait_for(
            lambda: [j for j in c.jobs() if j.dataset.endswith("/after") and j.state in (pb.DONE, pb.FAILED)],
            timeout=60,
            what="a folder dropped after",
        )
        assert after[0].state == pb.DONE, after[0].error

    log = (home / "daemon.log").read_text(errors="replace")
    assert log.count("Traceback") <= 2, log[-3000:]
    assert len(log) < 200_000, f"daemon.log grew to {len(log)} characters"


def _same(expected: str, got: str) -> bool:
    """A name that is not UTF-8 comes back with U+FFFD for each bad byte."""
    return os.fsencode(expected).decode("utf-8", "replace") == got


def test_a_folder_of_ten_thousand_files_is_taken_in_seconds(home, daemons, tmp_path):
    """The inbox watcher walks a waiting folder on every scan, and the intake walks it for links:
    10,000 files (5,000 images and their captions) must not make either slow."""
    d = daemons(home, "--workers", "0", "--quiet-seconds", "1")
    folder = tmp_path / "many"
    folder.mkdir()
    image = KINDS["png"].make(0)
    for i in range(5000):
        (folder / f"img{i:05d}.png").write_bytes(image)
        (folder / f"img{i:05d}.txt").write_text(f"zkw thing {i}")
    with d.client() as c:
        start = time.monotonic()
        shutil.move(folder, home / "inbox" / "many")
        (job,) = wait_for(lambda: c.jobs(), timeout=60, interval=0.1, what="the job")
        seconds = time.monotonic() - start
        assert job.state == pb.QUEUED, job.error
        assert c.status().pid == d.pid
    print(f"10,000-file folder queued {seconds:.1f} s after its move (quiet time 1 s)")
    assert seconds < 10, f"taking a 10,000-file folder took {seconds:.1f} s"
