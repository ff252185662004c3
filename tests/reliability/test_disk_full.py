"""A disk that fills up under a running job: outputs/ is a real tmpfs of 64 MB, filled to the last
byte while the job trains. The job fails with a sentence that says the disk is full, its last good
checkpoint and every file it lists stay whole, a LoRA tool asked meanwhile says the same, the
daemon keeps answering; once space is back, the job resumes from that checkpoint and a new job runs."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from loradrop.engine.tensorfile import TensorFile
from loradrop.proto.client import ClientError
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.testing import make_dataset, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ENV = {"OMP_NUM_THREADS": "1"}


def _tmpfs(folder: Path):
    """`folder` on its own 64 MB tmpfs while the fixture lives (needs root, as CI and this sandbox run)."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); this test needs root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_outputs(home):
    """home/outputs on its own tmpfs."""
    yield from _tmpfs(home / "outputs")


def _fill(folder: Path) -> Path:
    """Take every free byte of the file system holding `folder` (again, if called again)."""
    filler = folder / "filler"
    with open(filler, "ab", buffering=0) as f:
        for size in (1 << 20, 4096, 1):  # down to the last byte
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return filler


def test_a_full_disk_fails_the_job_clearly_and_keeps_its_last_checkpoint(home, daemons, small_outputs):
    d = daemons(home, "--workers", "1", "--quiet-seconds", "3600", "--max-retries", "0", env=ENV)
    make_dataset(home / "inbox" / "big", settings={"max_train_steps": 400, "resize_recipe": ""})
    make_dataset(home / "inbox" / "next", settings={"max_train_steps": 2, "resize_recipe": ""})
    with d.client() as c:
        job = c.submit("big")
        wait_for(lambda: c.job(job.id).progress.done >= 3, timeout=120, interval=0.05, what="three steps")
        filler = _fill(small_outputs)
        failed = wait_for(
            lambda: (j := c.job(job.id)).state in (pb.DONE, pb.FAILED) and j,
            timeout=60,
            what="the job to fail",
        )
        assert failed.state == pb.FAILED
        assert "no space left" in failed.error.lower() and "free" in failed.error, failed.error
        assert c.status().pid == d.pid

        state = home / "outputs" / job.id / "state" / "training-state.safetensors"
        with TensorFile(state) as f:  # the last good checkpoint, whole
            assert f.read_all()
        listed = c.artifacts(job.id)
        steps = [a for a in listed if a.kind == "step"]
        assert steps, "the steps saved before the disk filled are kept"
        for a in listed:
            assert not Path(a.path).name.startswith(".") and ".partial" not in a.path, a.path
            if a.path.endswith(".safetensors"):
                with TensorFile(a.path) as f:
                    f.read_all()

        _fill(small_outputs)  # what the failed job cleaned up (its partial files) is taken too
        with pytest.raises(ClientError) as e:  # a tool that writes a file says the same
            c.chop(steps[0].path, "SDXL-LyC-MIDALL")
        assert (
            e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "no space left" in str(e.value).lower()
        ), (e.value.code, str(e.value))

        filler.unlink()  # space is back
        assert c.retry(job.id).state == pb.QUEUED
        wait_for(
            lambda: any(
                "resuming after step" in e.log.text
                for e in c.events(job.id, follow=False)
                if e.HasField("log")
            ),
            timeout=120,
            what="the retry to resume from the kept checkpoint",
        )
        c.cancel(job.id)
        after = c.submit("next")
        done = wait_for(
            lambda: (j := c.job(after.id)).state in (pb.DONE, pb.FAILED) and j,
            timeout=120,
            what="the next job",
        )
        assert done.state == pb.DONE, done.error
        assert Path(c.chop(steps[0].path, "SDXL-LyC-MIDALL").path).is_file()
    assert os.path.ismount(small_outputs)


@pytest.fixture
def small_home(home):
    """The whole home on its own tmpfs: the job database fills up with the outputs."""
    yield from _tmpfs(home)


def test_a_full_home_never_loses_a_jobs_end_and_refuses_uploads_clearly(small_home, daemons, tmp_path):
    """With the home itself full, sqlite's "database or disk is full" made the daemon drop the
    worker's report that the job had failed: it stayed "running" for ever, cancel did nothing
    and retry said it was running, even after space was freed; an upload got INTERNAL."""
    home = small_home
    d = daemons(home, "--workers", "1", "--quiet-seconds", "3600", "--max-retries", "0", env=ENV)
    make_dataset(home / "inbox" / "big", settings={"max_train_steps": 400, "resize_recipe": ""})
    with d.client() as c:
        job = c.submit("big")
        wait_for(lambda: c.job(job.id).progress.done >= 2, timeout=120, interval=0.05, what="two steps")
        filler = _fill(home)
        failed = wait_for(
            lambda: (j := c.job(job.id)).state != pb.RUNNING and j, timeout=90, what="the job to end"
        )
        assert (
            failed.state == pb.FAILED
            and failed.error.startswith("disk full: ")
            and failed.error.count(". ") == 0
        ), failed.error
        assert c.status().pid == d.pid

        more = _fill(home / "inbox")  # what the failed write and the store's reserve gave back
        with pytest.raises(ClientError) as e:
            c.upload(make_dataset(tmp_path / "sent"))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(e.value).startswith(
            "disk full: "
        ), (e.value.code, str(e.value))
        assert not [p for p in (home / "inbox").iterdir() if p.name not in ("big", "filler")], (
            "a refused upload left files behind"
        )

        filler.unlink()
        more.unlink()  # space is back: the job can be retried and cancelled like any other
        assert c.retry(job.id).state == pb.QUEUED
        wait_for(lambda: c.job(job.id).state == pb.RUNNING, timeout=60, what="the retry to start")
        c.cancel(job.id)
        cancelled = wait_for(
            lambda: (j := c.job(job.id)).state == pb.CANCELLED and j, timeout=60, what="the cancel"
        )
        assert cancelled.state == pb.CANCELLED
