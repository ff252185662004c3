"""What a folder may hold, judged when it is queued, before any training: each of these was
accepted (or hung, or walked the whole disk) and failed late or never. One queue-only daemon
serves them all; each folder ends as a refused job with one sentence, or is queued."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from loradrop.proto.client import ClientError
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.testing import Daemon, make_dataset, wait_for

pytestmark = pytest.mark.timeout(300)
QUIET = 0.5


@pytest.fixture(scope="module")
def queue_only():
    root = Path(tempfile.mkdtemp(prefix="ldi-", dir="/tmp"))
    d = Daemon(root / "home", "--workers", "0", "--quiet-seconds", str(QUIET)).start()
    d.root = root
    yield d
    if d.process.poll() is None:
        d.stop()
    shutil.rmtree(root, ignore_errors=True)


def _dropped(d: Daemon, folder: Path, timeout: float = 30) -> pb.Job:
    """Move a prepared folder into the inbox; the job it becomes."""
    target = d.home / "inbox" / folder.name
    shutil.move(folder, target)
    with d.client() as c:
        return wait_for(
            lambda: next((j for j in c.jobs() if j.dataset == str(target)), None),
            timeout=timeout,
            what=f"{folder.name} to be judged",
        )


def _staged(d: Daemon, name: str, **kwargs) -> Path:
    return make_dataset(d.root / "staging" / name, **kwargs)


@pytest.mark.parametrize(
    ("vector", "words"),
    [
        ("1,0,1", "has 3 entries; a LoRA trained here has BASE and 20 UNet blocks, so give 21"),
        ("1" + ",1e308" * 20, "weighs a block 1e+308; give weights between -10 and 10"),
    ],
)
def test_a_block_vector_that_cannot_chop_is_refused_before_training(queue_only, vector, words):
    """ "1,0,1" trained for the whole job, then failed at chop; 1e308 wrote inf into the file."""
    job = _dropped(
        queue_only, _staged(queue_only, f"vector-{len(vector)}", settings={"block_vector": vector})
    )
    assert job.state == pb.FAILED and words in job.error and "loradrop.toml" in job.error, job.error
    with queue_only.client() as c:
        with pytest.raises(ClientError) as e:
            c.submit(job.dataset, block_vector=vector)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in str(e.value)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_loradrop_toml_that_is_not_a_file_is_refused(queue_only, kind):
    """It was ignored without a word and the job ran the full seed recipe; a FIFO would hang its reader."""
    folder = _staged(queue_only, f"toml-{kind}")
    (folder / "loradrop.toml").unlink()
    if kind == "fifo":
        os.mkfifo(folder / "loradrop.toml")
    else:
        (folder / "loradrop.toml").mkdir()
    job = _dropped(queue_only, folder)
    assert (
        job.state == pb.FAILED and f"loradrop.toml is a {'FIFO' if kind == 'fifo' else 'folder'}" in job.error
    ), job.error


def test_samples_past_the_limits_are_refused_before_training(queue_only):
    """--w 4096 --h 4096 --s 1000 rendered for minutes at every sample step and ignored cancel."""
    job = _dropped(
        queue_only,
        _staged(
            queue_only,
            "huge-samples",
            settings={"sample_every_n_steps": 1},
            prompts=["zkw --w 1024 --h 1024", "zkw --w 4096 --h 4096 --s 1000"],
        ),
    )
    assert (
        job.state == pb.FAILED
        and "sample-prompts.txt, line 2" in job.error
        and "4096x4096 is too large" in job.error
    ), job.error


def test_a_hard_link_to_a_file_outside_is_refused(queue_only, tmp_path):
    """Its text was read as a caption and shown in events; uploads refuse hard links already."""
    secret = queue_only.root / "secret.txt"  # on the same file system as the inbox
    secret.write_text("not for the daemon")
    folder = _staged(queue_only, "hardlinked")
    (folder / "img0.txt").unlink()
    os.link(secret, folder / "img0.txt")
    (folder / "img1-copy.png").hardlink_to(folder / "img1.png")  # two names inside the folder: fine
    job = _dropped(queue_only, folder)
    assert job.state == pb.FAILED and "hard links to files outside it (img0.txt)" in job.error, job.error
    assert "img1" not in job.error


def test_an_inbox_entry_linking_to_the_root_is_refused_at_once_and_names_nothing_outside(queue_only):
    """Intake walked the whole tree (19 s, delaying other drops) and listed names from outside."""
    link = queue_only.home / "inbox" / "everything"
    start = time.monotonic()
    link.symlink_to("/", target_is_directory=True)
    with queue_only.client() as c:
        job = wait_for(
            lambda: next((j for j in c.jobs() if j.dataset == str(link)), None),
            timeout=60,
            interval=0.05,
            what="the link to be judged",
        )
    seconds = time.monotonic() - start
    assert job.state == pb.FAILED and "everything is a symlink pointing outside the inbox" in job.error, (
        job.error
    )
    assert "(" not in job.error, f"the error names files: {job.error}"
    assert seconds < QUIET + 5, f"judging a link to / took {seconds:.1f} s"


def test_a_queued_folder_is_not_queued_twice_silently_nor_listed_as_waiting(home, daemons):
    """Submitting a folder already queued made a silent duplicate, and `loradrop status` listed
    a submitted folder as "waiting (until quiet)" for as long as the quiet time lasted (here an
    hour). Now the second submit is refused with the first job's id, and the folder waits no more."""
    d = daemons(home, "--workers", "0", "--quiet-seconds", "3600")
    make_dataset(home / "inbox" / "twice")
    with d.client() as c:
        wait_for(lambda: "twice" in c.status().pending_folders, what="the folder to wait")
        first = c.submit("twice")
        assert "twice" not in c.status().pending_folders
        with pytest.raises(ClientError) as e:
            c.submit("twice")
        assert (
            e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            and f"queued already as job {first.id}" in str(e.value)
        ), str(e.value)
        other = c.submit("twice", name="twice-again")  # other settings make a second job, on purpose
        assert other.id != first.id
        c.cancel(first.id)
        assert c.submit("twice").state == pb.QUEUED  # once it ended, it may be queued again
        time.sleep(1.5)  # the watcher's scans since then keep it off the list
        assert c.status().pending_folders == [] and len(c.jobs()) == 3
