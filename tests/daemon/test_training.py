"""End to end over a real daemon that really trains (the tiny twin, 64 px, a few steps): drop →
trained, resized and chopped; crashes of the worker and of the daemon; the tools and files API."""

from __future__ import annotations

import io
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import grpc
import pytest
from PIL import Image

from loradrop.proto.client import ClientError, state_name
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.testing import Daemon, make_dataset, pid_alive, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
QUIET = "0.5"
VECTOR = "1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0"  # the middle block only
PROMPTS = ["a photo of zkw thing --w 64 --h 64 --s 2 --d 7"]
# One torch thread per worker: these tiny steps gain nothing from two, and the tests often share
# the machine's two cores with other test processes, where two threads fight and stall.
ENV = {"OMP_NUM_THREADS": "1"}


def _finished(client, job_id: str, timeout: float = 180) -> pb.Job:
    return client.wait_job(job_id, timeout)


def _progress_at_least(client, job_id: str, step: int, timeout: float = 120) -> None:
    def reached():
        job = client.job(job_id)
        assert job.state in (pb.QUEUED, pb.RUNNING), (
            f"job {job_id} ended early: {state_name(job.state)} {job.error}"
        )
        return job.state == pb.RUNNING and job.progress.stage == "train" and job.progress.done >= step

    wait_for(reached, timeout=timeout, interval=0.05, what=f"job {job_id} to train {step} steps")


def _tensors(path: str) -> dict:
    from loradrop.engine.tensorfile import TensorFile

    with TensorFile(path) as f:
        return f.read_all()


def _same_weights(a: str, b: str) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    different = [
        k
        for k in ta
        if not (ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and bool((ta[k] == tb[k]).all()))
    ]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """One daemon with one CPU worker, shared by the tests of this module (a worker's start costs seconds)."""
    root = Path(os.path.realpath(tmp_path_factory.mktemp("t")))
    home = Path(tempfile.mkdtemp(prefix="ld-", dir="/tmp")) / "home"
    hook_out = root / "hook.txt"
    hook = f'printf "%s|%s|%s|%s|%s\\n" "$LORADROP_JOB_ID" "$LORADROP_JOB_STATE" "$LORADROP_JOB_NAME" "$LORADROP_CHOPPED" "$(echo "$LORADROP_ARTIFACTS" | wc -l)" >> {hook_out}'
    d = Daemon(
        home, "--quiet-seconds", QUIET, "--workers", "1", "--max-retries", "1", "--on-job-end", hook, env=ENV
    ).start()
    d.hook_out, d.root = hook_out, root
    yield d
    if d.process.poll() is None:
        d.stop()
    shutil.rmtree(home.parent, ignore_errors=True)


def test_drop_gives_trained_resized_and_chopped_artifacts(trainer):
    d = trainer
    folder = make_dataset(
        d.root / "drop",
        settings={"name": "zkw", "block_vector": VECTOR, "sample_every_n_steps": 4},
        prompts=PROMPTS,
    )
    streams: list[list[tuple[int, str]]] = [[] for _ in range(20)]

    def watch(out):
        with d.client() as c:
            job_id = wait_for(lambda: c.jobs() and c.jobs()[-1].id, what="the job")
            out.extend((e.seq, e.kind) for e in c.events(job_id, follow=True))

    watchers = [threading.Thread(target=watch, args=(s,)) for s in streams]
    for w in watchers:
        w.start()
    shutil.move(folder, d.home / "inbox" / "drop")
    with d.client() as c:
        job = wait_for(lambda: c.jobs() and c.jobs()[-1], what="the job")
        job = _finished(c, job.id)
        assert job.state == pb.DONE, job.error
        out = d.home / "outputs" / job.id
        for path in (job.final, job.resized, job.chopped):
            assert Path(path).is_file() and Path(path).parent == out
        assert Path(job.chopped).name.endswith("-chop.safetensors")

        stored = [(e.seq, e.kind) for e in c.events(job.id, follow=False)]
        for w in watchers:
            w.join(30)
        assert stored == sorted(stored) and [s for s, _ in stored] == list(range(1, len(stored) + 1))
        for s in streams:  # 20 clients followed the whole job live: each saw all of it, in order
            assert s == stored
        kinds = {k for _, k in stored}
        assert {"state", "stage", "progress", "artifact"} <= kinds

        artifacts = {a.kind: a for a in c.artifacts(job.id)}
        assert {"final", "resized", "chopped"} <= artifacts.keys()
        fetched = c.download(job.chopped, d.root)
        assert fetched.read_bytes() == Path(job.chopped).read_bytes()

        samples = [e for e in c.events(job.id, follow=False) if e.HasField("sample")]
        assert samples, "the recipe asked for samples"
        image = c.sample(job_id=job.id, seq=samples[-1].seq, max_size=32)
        assert Image.open(io.BytesIO(image.png)).size == (image.width, image.height)
        assert max(image.width, image.height) <= 32 and image.original_width == 64

        layout = c.block_layout(job.final)
        assert len(layout.blocks) == 20 and layout.vector.startswith("1,INP01,") and layout.pass_through > 0
        assert (
            all(b.tensors > 0 for b in layout.blocks) and abs(sum(b.share for b in layout.blocks) - 1) < 1e-6
        )
        assert "SDXL-LyC-MIDALL" in {p.name for p in layout.presets}

        resized = c.resize(job.final)  # the job's resize recipe
        assert Path(resized.path).is_file() and resized.kind == "resized" and resized.job_id == job.id
        chopped = c.chop(job.final, "SDXL-LyC-OUTALL")
        assert Path(chopped.path).is_file() and chopped.kind == "chopped"
        assert {resized.path, chopped.path} <= {a.path for a in c.artifacts(job.id)}
        with pytest.raises(ClientError) as e:
            c.chop(job.final, "1,1,1")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "needs 21 entries" in str(e.value)

        previews = c.preview(
            job.final, vector=VECTOR, prompts=["zkw thing --w 64 --h 64 --s 2"], seed=3, max_size=48
        )
        assert previews and all(Path(p.path).is_file() and 0 < p.width <= 48 for p in previews)

    hook_lines = wait_for(
        lambda: d.hook_out.exists() and d.hook_out.read_text().splitlines(), what="the on-job-end command"
    )
    job_id, state, name, chopped_path, n_artifacts = hook_lines[-1].split("|")
    assert (job_id, state, name, chopped_path) == (job.id, "done", "zkw", job.chopped) and int(
        n_artifacts
    ) >= 3
    maps = Path(f"/proc/{d.pid}/maps").read_text()
    assert "libtorch" not in maps, "the server process loaded torch"


def test_a_kohya_folder_is_taken_and_its_job_log_reports_each_subfolder(trainer):
    d = trainer
    folder = d.root / "kohya"
    make_dataset(folder / "5_zkw", images=2)
    make_dataset(folder / "2_other", images=1)
    (folder / "loradrop.toml").write_text(
        (folder / "5_zkw" / "loradrop.toml").read_text()
    )  # the daemon reads the top's
    (folder / "5_zkw" / "loradrop.toml").unlink()
    (folder / "2_other" / "loradrop.toml").unlink()
    shutil.move(folder, d.home / "inbox" / "kohya")
    with d.client() as c:
        job = wait_for(lambda: [j for j in c.jobs() if Path(j.dataset).name == "kohya"], what="the job")[0]
        job = _finished(c, job.id)
        assert job.state == pb.DONE, job.error
        logs = [e.log.text for e in c.events(job.id, follow=False) if e.HasField("log")]
    assert (
        f"{d.home / 'inbox' / 'kohya'}: 3 images, 12 per epoch, from 2 folders (kohya's N_name layout)"
        in logs
    )
    assert "  5_zkw/: 2 images x 5 repeats = 10 per epoch, 0 skipped" in logs


def test_a_killed_worker_resumes_then_fails_and_the_next_job_runs(trainer):
    d = trainer
    with d.client() as c:
        make_dataset(d.home / "inbox" / "victim", settings={"max_train_steps": 60})
        make_dataset(d.home / "inbox" / "after")
        victim = c.submit("victim", name="victim")
        after = c.submit("after", name="after")
        for attempt in (1, 2):
            _progress_at_least(c, victim.id, 1)
            (worker,) = c.status().workers
            assert worker.job_id == victim.id
            os.kill(worker.pid, signal.SIGKILL)
            # the daemon answers at once, and a new worker takes over
            assert c.status().pid == d.pid
            wait_for(lambda: c.status().workers[0].pid not in (0, worker.pid), what="a new worker")
            if attempt == 1:
                job = wait_for(lambda: (j := c.job(victim.id)).attempts == 1 and j, what="the retry")
                assert job.state in (pb.QUEUED, pb.RUNNING)
        failed = _finished(c, victim.id)
        assert failed.state == pb.FAILED and "was killed by SIGKILL" in failed.error
        logs = [e.log.text for e in c.events(victim.id, follow=False) if e.HasField("log")]
        assert any("resuming from the last full checkpoint (retry 1 of 1)" in t for t in logs)
        done = _finished(c, after.id)
        assert done.state == pb.DONE, done.error


def test_cancel_save_and_sample_now_reach_the_running_job(trainer):
    d = trainer
    with d.client() as c:
        make_dataset(d.home / "inbox" / "long", settings={"max_train_steps": 400, "save_every_n_steps": 0})
        job = c.submit("long", name="long")
        _progress_at_least(c, job.id, 1)
        c.save_now(job.id)
        steps = wait_for(
            lambda: [
                e.artifact.path
                for e in c.events(job.id, follow=False)
                if e.HasField("artifact") and e.artifact.kind == "step"
            ],
            what="the saved step",
        )
        # a preview while the job trains is rendered between two of its steps, on its loaded model
        (image,) = c.preview(steps[0], prompts=["zkw thing --w 64 --h 64 --s 2"], seed=1)
        assert image.width == 64 and Path(image.path).parent == d.home / "outputs" / job.id / "previews"
        assert c.job(job.id).state == pb.RUNNING
        c.cancel(job.id)
        cancelled = _finished(c, job.id)
        assert cancelled.state == pb.CANCELLED and cancelled.progress.done < 400
        with pytest.raises(ClientError) as e:
            c.sample_now(job.id)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert c.retry(job.id).state == pb.QUEUED
        c.cancel(job.id)
        _finished(c, job.id)


def test_sigterm_and_kill_9_during_training_resume_to_the_same_weights(tmp_path):
    home = Path(tempfile.mkdtemp(prefix="ld-", dir="/tmp")) / "home"
    settings = {"max_train_steps": 10}
    d = Daemon(home, "--quiet-seconds", "60", "--workers", "1", env=ENV).start()
    try:
        with d.client() as c:
            make_dataset(home / "inbox" / "data", settings=settings)
            reference = c.submit("data", name="reference")
            victim = c.submit("data", name="victim")
            assert _finished(c, reference.id).state == pb.DONE

            _progress_at_least(c, victim.id, 3)
        assert d.stop(timeout=60) == 0  # SIGTERM: clean, the job goes back to the queue
        d.start()
        with d.client() as c:
            job = c.job(victim.id)
            assert job.state in (pb.QUEUED, pb.RUNNING)
            _progress_at_least(c, victim.id, 7)
            workers = [w.pid for w in c.status().workers]
        d.kill()  # kill -9: the worker goes with it, nothing is left running
        wait_for(
            lambda: not any(pid_alive(p) for p in workers),
            timeout=10,
            what="the worker to die with the daemon",
        )
        d.start()
        with d.client() as c:
            done = _finished(c, victim.id)
            assert done.state == pb.DONE, done.error
            texts = [e.log.text for e in c.events(victim.id, follow=False) if e.HasField("log")]
            assert any("the daemon is stopping" in t for t in texts)
            assert any("the daemon stopped while this job ran" in t for t in texts)
            # after each interruption, training went on from a checkpoint: never from step 1 again
            restarted, first_steps = False, []
            for e in c.events(victim.id, follow=False):
                if e.HasField("log") and (
                    "the daemon is stopping" in e.log.text or "stopped while this job ran" in e.log.text
                ):
                    restarted = True
                elif restarted and e.HasField("progress") and e.progress.stage == "train":
                    first_steps.append(e.progress.done)
                    restarted = False
            assert len(first_steps) == 2 and min(first_steps) > 1, first_steps
            _same_weights(done.final, c.job(reference.id).final)
    finally:
        if d.process.poll() is None:
            d.stop()
        shutil.rmtree(home.parent, ignore_errors=True)
