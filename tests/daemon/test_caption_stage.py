"""The daemon's caption stage through a real daemon: a dropped folder without captions captioned by
the tiny WD14-layout tagger (trigger first) and trained; refused with one sentence when there is
no captioner; held in review with `review = true` across a restart, until accepted by the API."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from loradrop.proto.client import ClientError, state_name
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.testing import Daemon, make_dataset, wait_for

pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
QUIET = "0.5"
ENV = {"OMP_NUM_THREADS": "1"}  # see test_training.py: tiny steps, a shared two-core machine


@pytest.fixture(scope="module")
def root():
    folder = Path(tempfile.mkdtemp(prefix="ldc-", dir="/tmp"))  # short: the socket path has a length limit
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tagger(root):
    from loradrop.engine.caption.tiny import make_tiny_tagger

    return make_tiny_tagger(root / "tagger")


@pytest.fixture(scope="module")
def captioning(root, tagger):
    """A daemon with a captioner and one CPU worker."""
    d = Daemon(
        root / "home", "--quiet-seconds", QUIET, "--workers", "1", "--captioner", str(tagger), env=ENV
    ).start()
    yield d
    if d.process.poll() is None:
        d.stop()


@pytest.fixture(scope="module")
def queue_only(root, tagger):
    """No captioner, no worker: what intake decides. The tagger is in its models/, for caption_model."""
    d = Daemon(root / "q-home", "--quiet-seconds", QUIET, "--workers", "0").start()
    shutil.copytree(tagger, d.home / "models" / "tagger")
    yield d
    if d.process.poll() is None:
        d.stop()


def _uncaptioned(root: Path, name: str, images: int = 2, **settings) -> Path:
    folder = make_dataset(root / "staging" / name, images=images, settings=settings)
    for caption in folder.glob("img*.txt"):
        caption.unlink()
    return folder


def _drop(d: Daemon, folder: Path) -> tuple[Path, pb.Job]:
    target = d.home / "inbox" / folder.name
    shutil.move(folder, target)
    with d.client() as c:
        job = wait_for(
            lambda: next((j for j in c.jobs() if j.dataset == str(target)), None),
            what=f"{folder.name} to become a job",
        )
    return target, job


def _state(d: Daemon, job_id: str, states: tuple[int, ...], timeout: float = 180) -> pb.Job:
    with d.client() as c:
        return c.wait_job(job_id, timeout, states=frozenset(states))


def _events(d: Daemon, job_id: str) -> list[pb.Event]:
    with d.client() as c:
        return list(c.events(job_id, follow=False))


def test_a_folder_without_captions_is_captioned_then_trained(captioning):
    folder, job = _drop(captioning, _uncaptioned(captioning.home.parent, "plain", trigger="zkw"))
    assert job.captioner and job.trigger == "zkw" and not job.review
    with captioning.client() as c:
        assert c.status().captioner == job.captioner
    job = _state(captioning, job.id, (pb.DONE, pb.FAILED, pb.CANCELLED))
    assert job.state == pb.DONE, f"{state_name(job.state)}: {job.error}\n{captioning.log()}"
    for i in range(2):
        caption = (folder / f"img{i}.txt").read_text()
        assert caption.startswith("zkw, 1girl, solo") and caption.endswith("\n"), caption
    events = _events(captioning, job.id)
    stages = [e.stage.stage for e in events if e.kind == "stage"]
    assert stages[:2] == ["caption", "scan"], stages
    progress = [
        (e.progress.done, e.progress.total)
        for e in events
        if e.kind == "progress" and e.progress.stage == "caption"
    ]
    assert progress and progress[-1] == (2, 2), progress


def test_review_holds_the_job_across_a_restart_until_accepted(captioning):
    folder, job = _drop(captioning, _uncaptioned(captioning.home.parent, "reviewed", review=True))
    assert job.review
    held = _state(captioning, job.id, (pb.REVIEW, pb.DONE, pb.FAILED))
    assert held.state == pb.REVIEW, f"{state_name(held.state)}: {held.error}"
    assert (folder / "img0.txt").read_text().startswith("1girl")
    (folder / "img1.txt").write_text(
        "zkw, a person's own caption\n"
    )  # edited during review: kept, not captioned again

    captioning.stop()
    captioning.start()
    with captioning.client() as c:
        assert c.job(job.id).state == pb.REVIEW
        accepted = c.accept_captions(job.id)
        assert accepted.state in (pb.QUEUED, pb.RUNNING)
        with pytest.raises(ClientError) as refused:
            c.accept_captions(job.id)  # once is enough
        assert (
            refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            and "not waiting for caption review" in str(refused.value)
        )
    done = _state(captioning, job.id, (pb.DONE, pb.FAILED, pb.CANCELLED))
    assert done.state == pb.DONE, f"{state_name(done.state)}: {done.error}"
    assert (folder / "img1.txt").read_text() == "zkw, a person's own caption\n"
    stages = [e.stage.stage for e in _events(captioning, job.id) if e.kind == "stage"]
    assert stages.count("caption") == 1 and "scan" in stages, stages


def test_without_a_captioner_the_job_fails_naming_the_images_and_the_fix(queue_only):
    folder = _uncaptioned(queue_only.home.parent, "nocap", images=5)
    (folder / "img2.txt").write_text("a photo of zkw thing")
    target, job = _drop(queue_only, folder)
    assert job.state == pb.FAILED
    assert (
        f"4 of 5 images in {target} have no .txt caption (img0.png, img1.png, img3.png and 1 more)"
        in job.error
    ), job.error
    assert "`loradrop caption" in job.error and "--captioner PATH" in job.error and "\n" not in job.error
    for image in target.glob("img*.png"):  # the fix the sentence names, then a retry reads the folder again
        image.with_suffix(".txt").write_text("a photo of zkw thing")
    with queue_only.client() as c:
        assert c.retry(job.id).state == pb.QUEUED


def test_caption_settings_are_checked_at_intake(queue_only, tagger):
    _, job = _drop(
        queue_only, _uncaptioned(queue_only.home.parent, "tomlcap", caption_model="tagger", trigger="zkw")
    )
    assert (
        job.state == pb.QUEUED
        and job.captioner == str(queue_only.home / "models" / "tagger")
        and job.trigger == "zkw"
    ), job.error
    for name, settings, words in [
        ("comma", {"trigger": "a, b"}, "trigger 'a, b' must be one word or phrase without commas"),
        ("outside", {"caption_model": str(tagger)}, "is outside the daemon's folders"),
        (
            "kind",
            {"caption_model": "tagger", "caption_kind": "clip"},
            'caption_kind must be "tagger" or "vlm"',
        ),
        ("review", {"review": "yes"}, "review must be true or false"),
        ("not-a-model", {"caption_model": "."}, "holds no model.onnx (a WD14 tagger) or config.json"),
        ("not-a-vlm", {"caption_model": "tagger", "caption_kind": "vlm"}, "holds no config.json"),
    ]:
        _, job = _drop(queue_only, _uncaptioned(queue_only.home.parent, f"bad-{name}", **settings))
        assert job.state == pb.FAILED and words in job.error, job.error


def test_captions_are_listed_and_edited_through_the_api(queue_only):
    folder, job = _drop(queue_only, _uncaptioned(queue_only.home.parent, "edited", caption_model="tagger"))
    assert job.state == pb.QUEUED, job.error
    with queue_only.client() as c:
        listed = c.captions(job.id)
        assert [(Path(x.image).name, x.exists, x.text) for x in listed] == [
            ("img0.png", False, ""),
            ("img1.png", False, ""),
        ]
        saved = c.set_caption(job.id, "img0.png", "  zkw, a thing  ")
        assert (
            saved.exists
            and saved.text == "zkw, a thing"
            and (folder / "img0.txt").read_text() == "zkw, a thing\n"
        )
        c.set_caption(job.id, str(folder / "img1.png"), "zkw")
        assert [x.text for x in c.captions(job.id)] == ["zkw, a thing", "zkw"]
        for image, text, code in [
            ("../edited/img0.png", "x", grpc.StatusCode.NOT_FOUND),
            ("/etc/passwd", "x", grpc.StatusCode.NOT_FOUND),
            ("loradrop.toml", "x", grpc.StatusCode.NOT_FOUND),
            ("img0.png", "two\nlines", grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(ClientError) as refused:
                c.set_caption(job.id, image, text)
            assert refused.value.code == code, (image, refused.value)
        assert (folder / "img0.txt").read_text() == "zkw, a thing\n" and not (
            folder / "loradrop.txt"
        ).exists()


def test_a_captioner_that_is_no_model_stops_the_daemon_at_its_start(root):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "loradrop", "daemon", "--home", str(root / "never"), "--captioner", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and f"--captioner {root} holds no model.onnx" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_a_job_in_review_is_cancelled_by_a_cancel_or_by_removing_its_folder(captioning):
    jobs = [
        _drop(captioning, _uncaptioned(captioning.home.parent, f"dropped-{how}", review=True))
        for how in ("cancel", "rmtree")
    ]
    for _, job in jobs:
        assert _state(captioning, job.id, (pb.REVIEW, pb.DONE, pb.FAILED)).state == pb.REVIEW
    (_, by_call), (folder, by_removal) = jobs
    with captioning.client() as c:
        assert c.cancel(by_call.id).state == pb.CANCELLED
    shutil.rmtree(folder)
    cancelled = _state(captioning, by_removal.id, (pb.CANCELLED, pb.DONE, pb.FAILED), timeout=30)
    assert cancelled.state == pb.CANCELLED and "its folder was removed" in cancelled.error, cancelled.error
