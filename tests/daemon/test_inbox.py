"""The watched inbox over a real daemon (no training worker: jobs stay queued, which is what
these tests look at)."""

from __future__ import annotations

import shutil
import time
import tomllib

import pytest

from loradrop.daemon.store import Store
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.testing import make_dataset, toml_text, wait_for

pytestmark = pytest.mark.timeout(120)
QUIET = 0.8
VECTOR = "1,0,1" + ",0" * 18


def test_a_dropped_folder_becomes_a_job_with_its_settings_frozen(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", str(QUIET))
    folder = make_dataset(
        tmp_path / "cats",
        settings={"name": "kitty", "block_vector": VECTOR, "max_train_steps": 7, "unet_lr": 1e-4},
    )
    shutil.move(folder, home / "inbox" / "cats")
    with d.client() as c:
        (job,) = wait_for(c.jobs, what="the job")
        assert job.state == pb.QUEUED and job.source == "inbox"
        assert job.name == "kitty" and job.id.endswith("-kitty")
        assert job.block_vector == VECTOR
        assert job.dataset == str(home / "inbox" / "cats")
        recipe = tomllib.loads(job.recipe_toml)
        assert (
            recipe["max_train_steps"] == 7 and recipe["unet_lr"] == 1e-4 and recipe["output_name"] == "kitty"
        )
        assert recipe["network_dim"] == 8  # untouched keys keep the seed's defaults
        # frozen: editing the folder's file later changes nothing
        (home / "inbox" / "cats" / "loradrop.toml").write_text("max_train_steps = 99\n")
        time.sleep(2 * QUIET)
        assert tomllib.loads(c.job(job.id).recipe_toml)["max_train_steps"] == 7
        assert len(c.jobs()) == 1


def test_a_slow_copy_does_not_start_early(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", str(QUIET))
    source = make_dataset(tmp_path / "src", images=3)
    target = home / "inbox" / "slow"
    target.mkdir()
    with d.client() as c:
        for path in sorted(source.iterdir()):
            # each file arrives in two halves, with pauses shorter than the quiet time
            data = path.read_bytes()
            with open(target / path.name, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(QUIET / 2)
                assert c.jobs() == [], f"started while {path.name} was half written"
                f.write(data[len(data) // 2 :])
            time.sleep(QUIET / 2)
            assert c.jobs() == [], f"started after {path.name}, before the copy ended"
        assert "slow" in c.status().pending_folders
        (job,) = wait_for(c.jobs, what="the job after the copy")
        assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in source.iterdir())
        assert job.name == "slow"


def test_renames_are_followed(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", str(QUIET))
    make_dataset(tmp_path / "a")
    shutil.move(tmp_path / "a", home / "inbox" / "first")
    (home / "inbox" / "first").rename(home / "inbox" / "second")  # while still waiting
    with d.client() as c:
        (job,) = wait_for(c.jobs, what="the job")
        assert job.dataset == str(home / "inbox" / "second")
        (home / "inbox" / "second").rename(home / "inbox" / "third")  # after it was queued
        wait_for(lambda: c.job(job.id).dataset == str(home / "inbox" / "third"), what="the new path")
        time.sleep(2 * QUIET)
        assert len(c.jobs()) == 1 and c.job(job.id).state == pb.QUEUED


def test_a_folder_removed_before_it_starts_cancels_its_job(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", str(QUIET))
    shutil.move(make_dataset(tmp_path / "gone"), home / "inbox" / "gone")
    with d.client() as c:
        (job,) = wait_for(c.jobs, what="the job")
        shutil.rmtree(home / "inbox" / "gone")
        cancelled = wait_for(lambda: c.job(job.id).state == pb.CANCELLED and c.job(job.id), what="the cancel")
        assert "removed from the inbox" in cancelled.error
        # a new folder of the same name is a new job
        shutil.move(make_dataset(tmp_path / "gone2"), home / "inbox" / "gone")
        wait_for(lambda: len(c.jobs()) == 2, what="the second job")


def test_folders_present_at_start_are_taken_once_across_restarts(home, daemons, tmp_path):
    (home / "inbox").mkdir(parents=True)
    for name in ("one", "two"):
        make_dataset(home / "inbox" / name)
    first = daemons(home, "--workers", "0", "--quiet-seconds", str(QUIET))
    with first.client() as c:
        wait_for(lambda: len(c.jobs()) == 2, what="both jobs")
    assert first.stop() == 0
    make_dataset(home / "inbox" / "three")  # arrives while the daemon is down
    second = daemons(home, "--workers", "0", "--quiet-seconds", str(QUIET))
    with second.client() as c:
        wait_for(lambda: len(c.jobs()) == 3, what="the third job")
        time.sleep(3 * QUIET)
        assert sorted(j.name for j in c.jobs()) == ["one", "three", "two"]
    second.kill()  # and after a kill -9 too
    third = daemons(home, "--workers", "0", "--quiet-seconds", str(QUIET))
    with third.client() as c:
        time.sleep(3 * QUIET)
        assert len(c.jobs()) == 3
        assert all(j.state == pb.QUEUED for j in c.jobs())


def test_a_bad_loradrop_toml_fails_the_job_with_the_reason_and_retry_reads_it_again(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", str(QUIET))
    folder = make_dataset(tmp_path / "bad", settings={"max_train_steps": 0})
    shutil.move(folder, home / "inbox" / "bad")
    with d.client() as c:
        (job,) = wait_for(c.jobs, what="the job")
        assert job.state == pb.FAILED
        assert "max_train_steps must be at least 1" in job.error and "loradrop.toml" in job.error
        (home / "inbox" / "bad" / "loradrop.toml").write_text("max_train_steps = 3\n")
        retried = c.retry(job.id)
        assert retried.state == pb.QUEUED and retried.error == ""
        assert tomllib.loads(retried.recipe_toml)["max_train_steps"] == 3


def test_submitted_and_uploaded_folders_are_not_taken_twice(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", str(QUIET))
    make_dataset(home / "inbox" / "direct")
    with d.client() as c:
        job = c.submit("direct", overrides=["max_train_steps=2"], name="mine")
        assert job.source == "submit" and job.name == "mine"
        uploaded = c.upload(make_dataset(tmp_path / "sent"))
        assert uploaded.source == "upload" and (home / "inbox" / "sent").is_dir()
        time.sleep(3 * QUIET)
        assert [j.id for j in c.jobs()] == [job.id, uploaded.id]


def test_the_job_end_command_hears_of_every_ending(home, daemons, tmp_path):
    out = tmp_path / "ended.txt"
    hook = f'echo "$LORADROP_JOB_ID $LORADROP_JOB_STATE $LORADROP_JOB_NAME" >> {out}'
    d = daemons(home, "--workers", "0", "--quiet-seconds", str(QUIET), "--on-job-end", hook)
    make_dataset(home / "inbox" / "kept")
    with d.client() as c:
        job = c.submit("kept", name="kept")
        c.cancel(job.id)
        shutil.move(make_dataset(tmp_path / "bad", settings={"max_train_steps": -1}), home / "inbox" / "bad")
        wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 2, what="two endings")
    assert sorted(out.read_text().splitlines()) == ["0001-kept cancelled kept", "0002-bad failed bad"]


def test_a_folder_pins_its_job_and_a_bad_pin_refuses_it(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", str(QUIET))
    for name, pin in (("pinned", "accelerator_type:H100"), ("spaced", "a b"), ("number", 3)):
        shutil.move(make_dataset(tmp_path / name, settings={"pin": pin}), home / "inbox" / name)
    with d.client() as c:
        jobs = {j.name: j for j in wait_for(lambda: len(c.jobs()) == 3 and c.jobs(), what="three jobs")}
        assert jobs["pinned"].state == pb.QUEUED
        for name in ("spaced", "number"):
            assert jobs[name].state == pb.FAILED
            assert "loradrop.toml: pin" in jobs[name].error, jobs[name].error
        assert "'a b' is not a Ray resource name" in jobs["spaced"].error
        assert "pin must be a string" in jobs["number"].error
        fixed = tomllib.loads((home / "inbox" / "spaced" / "loradrop.toml").read_text()) | {"pin": "big"}
        (home / "inbox" / "spaced" / "loradrop.toml").write_text(toml_text(fixed))
        assert c.retry(jobs["spaced"].id).state == pb.QUEUED
    assert d.stop() == 0
    store = Store(home / "state.sqlite")  # the API does not show pins; the store keeps them
    try:
        assert {j.name: j.pin for j in store.jobs()} == {
            "pinned": "accelerator_type:H100",
            "spaced": "big",  # a retry reads the folder's file again
            "number": "",
        }
    finally:
        store.close()
