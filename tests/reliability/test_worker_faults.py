"""A training worker that will not let go: a sample of a megapixel at 150 steps when a cancel or
a stop comes, a worker frozen with SIGSTOP, a preview asked for while a job trains, outputs on a
read-only disk. One daemon with one CPU worker serves the tests that do not stop it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.proto.v1 import loradrop_pb2_grpc as rpc
from loradrop.testing import Daemon, make_dataset, pid_alive, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
ENV = {"OMP_NUM_THREADS": "1"}
HEARTBEAT = 8  # seconds: far above any pause of a healthy worker here, short enough for a test
BIG_SAMPLE = ["zkw thing --w 1024 --h 1024 --s 150 --d 1"]  # about 4 minutes on this machine's CPU
LONG = {"max_train_steps": 400, "save_every_n_steps": 0, "resize_recipe": ""}


@pytest.fixture(scope="module")
def trainer():
    root = Path(tempfile.mkdtemp(prefix="ldw-", dir="/tmp"))
    d = Daemon(
        root / "home",
        "--workers",
        "1",
        "--quiet-seconds",
        "3600",
        "--max-retries",
        "1",
        "--heartbeat-seconds",
        str(HEARTBEAT),
        env=ENV,
    ).start()
    yield d
    if d.process.poll() is None:
        d.stop()
    shutil.rmtree(root, ignore_errors=True)


def _ended(c, job_id: str, timeout: float) -> pb.Job:
    return c.wait_job(job_id, timeout, interval=0.1)


def _training(c, job_id: str, step: int, timeout: float = 180) -> None:
    wait_for(
        lambda: (
            (j := c.job(job_id)).state == pb.RUNNING
            and j.progress.stage == "train"
            and j.progress.done >= step
        ),
        timeout=timeout,
        interval=0.05,
        what=f"{job_id} to train {step} steps",
    )


def _logs(c, job_id: str) -> list[str]:
    return [e.log.text for e in c.events(job_id, follow=False) if e.HasField("log")]


def test_a_cancel_during_a_large_sample_stops_it_between_denoising_steps(trainer):
    """Cancel returned at once and the job ran on for minutes, rendering its sample."""
    make_dataset(
        trainer.home / "inbox" / "big-sample",
        settings={"max_train_steps": 3, "sample_every_n_steps": 1},
        prompts=BIG_SAMPLE,
    )
    with trainer.client() as c:
        job = c.submit("big-sample")
        _training(c, job.id, 1)
        time.sleep(3)  # well into the 150 steps of its first sample
        assert c.job(job.id).state == pb.RUNNING
        asked = time.monotonic()
        c.cancel(job.id)
        cancelled = _ended(c, job.id, 60)
        seconds = time.monotonic() - asked
    assert cancelled.state == pb.CANCELLED, cancelled.error
    assert seconds < 20, f"the cancel took {seconds:.0f} s"


def test_a_frozen_worker_is_killed_and_its_job_resumes_with_the_reason(trainer):
    """A SIGSTOPped worker went unnoticed: the job showed as running for ever."""
    make_dataset(trainer.home / "inbox" / "frozen", settings=LONG)
    with trainer.client() as c:
        job = c.submit("frozen")
        _training(c, job.id, 2)
        (worker,) = c.status().workers
        os.kill(worker.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(
            lambda: c.status().workers[0].pid not in (0, worker.pid),
            timeout=HEARTBEAT + 30,
            what="a new worker",
        )
        noticed = time.monotonic() - stopped
        _training(c, job.id, 3)  # it resumed on the new worker
        reason = f"did not answer for {HEARTBEAT} s (stopped or frozen), so the daemon killed it; resuming from the last full checkpoint (retry 1 of 1)"
        assert any(reason in t for t in _logs(c, job.id)), _logs(c, job.id)
        assert c.job(job.id).attempts == 1
        c.cancel(job.id)
        _ended(c, job.id, 60)
    assert HEARTBEAT <= noticed < HEARTBEAT + 30
    assert not pid_alive(worker.pid)


def test_a_preview_renders_between_training_steps_with_progress_and_can_be_cancelled(trainer):
    """A preview held the worker until it was done (the job's ETA jumped from 4 minutes to an
    hour) and said nothing but "rendering". Now it takes a bounded share of each step, reports
    its progress, renders 8 steps unless asked for more, stops when its caller goes away, and
    its images are listed as previews."""
    make_dataset(trainer.home / "inbox" / "previewed", settings={**LONG, "save_every_n_steps": 1})
    channel = grpc.insecure_channel(trainer.connect)
    stub = rpc.LoradropStub(channel)
    with trainer.client() as c:
        job = c.submit("previewed")
        _training(c, job.id, 1)
        lora = wait_for(
            lambda: next((a.path for a in c.artifacts(job.id) if a.kind == "step"), None), what="a step file"
        )

        reply = stub.Preview(
            pb.PreviewRequest(path=lora, prompts=["zkw --w 256 --h 256 --s 40"], steps=40, request_id="slow"),
            timeout=300,
        )
        assert len(reply.images) == 1 and reply.images[0].width == 256
        events = list(c.events(job.id, follow=False))
        mine = [i for i, e in enumerate(events) if e.HasField("preview") and e.preview.request_id == "slow"]
        assert events[mine[-1]].preview.step == events[mine[-1]].preview.steps == 40
        trained = [
            e for e in events[mine[0] : mine[-1]] if e.HasField("progress") and e.progress.stage == "train"
        ]
        assert len(trained) >= 3, f"the job trained {len(trained)} steps while the preview rendered"

        quick = stub.Preview(
            pb.PreviewRequest(path=lora, prompts=["zkw --w 64 --h 64 --s 30"], request_id="quick"),
            timeout=120,
        )
        steps = [
            e.preview.steps
            for e in c.events(job.id, follow=False)
            if e.HasField("preview") and e.preview.request_id == "quick"
        ]
        assert quick.images and steps and set(steps) == {8}, (
            steps
        )  # a quick look unless more steps are asked for
        kinds = {a.path: a.kind for a in c.artifacts(job.id)}
        assert all(kinds[image.path] == "preview" for image in [*reply.images, *quick.images])

        call = stub.Preview.future(
            pb.PreviewRequest(
                path=lora, prompts=["zkw --w 512 --h 512 --s 150"], steps=150, request_id="dropped"
            ),
            timeout=300,
        )

        def progress(request_id):
            return [
                e.preview.step
                for e in c.events(job.id, follow=False)
                if e.HasField("preview") and e.preview.request_id == request_id
            ]

        wait_for(lambda: progress("dropped"), timeout=120, what="the preview to start")
        call.cancel()
        time.sleep(3)
        stalled = progress("dropped")
        time.sleep(3)
        assert progress("dropped") == stalled and stalled[-1] < 150, "the cancelled preview went on rendering"
        again = stub.Preview(
            pb.PreviewRequest(path=lora, prompts=["zkw --w 64 --h 64"], request_id="after"), timeout=120
        )
        assert again.images
        assert c.job(job.id).state == pb.RUNNING
        c.cancel(job.id)
        _ended(c, job.id, 60)
    channel.close()


def test_a_stop_during_a_large_sample_is_prompt_and_a_second_one_names_its_cause(home, daemons):
    """A stop waited 30 s for a worker that was sampling, then killed it, and the job's log
    blamed "SIGKILL (out of memory, or killed)"; a second SIGTERM changed nothing."""
    d = daemons(home, "--workers", "1", "--quiet-seconds", "3600", env=ENV)
    make_dataset(
        home / "inbox" / "big", settings={"max_train_steps": 3, "sample_every_n_steps": 1}, prompts=BIG_SAMPLE
    )
    with d.client() as c:
        job = c.submit("big")
        _training(c, job.id, 1)
        time.sleep(3)
    asked = time.monotonic()
    assert d.stop(timeout=60) == 0
    assert time.monotonic() - asked < 15, "the stop waited for the sample"

    d.start()  # the job resumes; now its worker is frozen, and the daemon is told twice to stop
    with d.client() as c:
        _training(c, job.id, 1)
        (worker,) = c.status().workers
    os.kill(worker.pid, signal.SIGSTOP)
    asked = time.monotonic()
    d.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    d.process.send_signal(signal.SIGTERM)
    d.process.wait(30)
    assert time.monotonic() - asked < 10, "the second SIGTERM did not cut the wait short"
    d.start()
    with d.client() as c:
        texts = _logs(c, job.id)
        c.cancel(job.id)
    assert any(
        "the worker was killed by the daemon: the daemon was told to stop a second time" in t for t in texts
    ), texts
    assert not any("out of memory" in t for t in texts), texts


def test_read_only_outputs_fail_the_job_in_one_sentence(home, daemons):
    """A read-only outputs folder put a traceback in the job's log."""
    outputs = home / "outputs"
    outputs.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(outputs)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({mounted.stderr.strip()}); this test needs root")
    try:
        d = daemons(home, "--workers", "1", "--quiet-seconds", "3600", env=ENV)
        make_dataset(home / "inbox" / "cats", settings={"max_train_steps": 2})
        with d.client() as c:
            job = _ended(c, c.submit("cats").id, 180)
            logs = _logs(c, job.id)
        assert (
            job.state == pb.FAILED and "cannot write" in job.error and "Read-only file system" in job.error
        ), job.error
        assert job.error.count(";") == 1 and "\n" not in job.error
        assert not any("Traceback" in t for t in logs), logs
    finally:
        subprocess.run(["umount", "-l", str(outputs)], check=False)


def test_stalled_uploads_leave_the_daemon_answering(home, daemons):
    """128 uploads that sent one message and stalled took every server thread: Status timed out
    until they closed. Now past a few at once they are refused, an idle one is ended, and Status
    answers throughout."""
    d = daemons(home, "--workers", "0", "--quiet-seconds", "3600", "--idle-seconds", "4")
    channel = grpc.insecure_channel(d.connect)
    stub = rpc.LoradropStub(channel)
    release = threading.Event()

    def stalled():
        yield pb.UploadChunk(job=pb.SubmitJobRequest(dataset="stalled"), data=b"")
        release.wait(120)

    calls = [stub.UploadDataset.future(stalled(), timeout=120) for _ in range(128)]
    try:
        for _ in range(5):
            started = time.monotonic()
            assert stub.Status(pb.StatusRequest(), timeout=5).pid == d.pid
            assert time.monotonic() - started < 5
            time.sleep(0.5)
        refused = wait_for(
            lambda: (
                sum(1 for f in calls if f.done() and f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED) >= 120
                and True
            ),
            timeout=30,
            what="the uploads past the limit to be refused",
        )
        assert refused
        wait_for(lambda: all(f.done() for f in calls), timeout=30, what="the idle uploads to be ended")
        assert stub.Status(pb.StatusRequest(), timeout=5).pid == d.pid
        tar = make_dataset(home.parent / "src")
        with d.client() as c:
            assert c.upload(tar).state == pb.QUEUED  # uploads are taken again
        assert sorted(p.name for p in (home / "inbox").iterdir()) == ["src"], (
            "a stalled upload left something behind"
        )
    finally:
        release.set()
        channel.close()
