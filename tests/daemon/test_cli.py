"""The client commands against a real daemon: they answer fast and load no torch."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from support import make_dataset

pytestmark = pytest.mark.timeout(120)


def loradrop(*args: str, connect: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loradrop", *args, "--connect", connect], capture_output=True, text=True, timeout=60)


def test_client_commands_drive_the_queue(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    source = make_dataset(tmp_path / "cats")

    submitted = loradrop("submit", str(source), "--set", "max_train_steps=3", "--name", "tabby", connect=d.connect)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id == "0001-tabby" and (home / "inbox" / "cats").is_dir()

    listed = loradrop("jobs", connect=d.connect)
    assert listed.returncode == 0 and "0001-tabby" in listed.stdout and "queued" in listed.stdout

    in_place = loradrop("submit", str(home / "inbox" / "cats"), "--name", "again", connect=d.connect)
    assert in_place.stdout.strip() == "0002-again"
    assert sorted(p.name for p in (home / "inbox").iterdir()) == ["cats"]  # used in place, not copied

    cancelled = loradrop("cancel", "1", connect=d.connect)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    assert "has already ended" in loradrop("cancel", job_id, connect=d.connect).stderr

    followed = loradrop("logs", job_id, "-f", connect=d.connect)  # the job has ended: prints, then stops
    assert followed.returncode == 1
    assert "job queued" in followed.stdout and "job cancelled: cancelled by request" in followed.stdout

    retried = loradrop("retry", job_id, connect=d.connect)
    assert retried.returncode == 0 and "queued" in retried.stdout
    assert "queued" in loradrop("jobs", "--state", "queued", connect=d.connect).stdout

    status = loradrop("status", connect=d.connect)
    assert status.returncode == 0
    assert str(home / "inbox") in status.stdout and "2 queued" in status.stdout


def test_client_commands_answer_fast_without_torch(home, daemons):
    d = daemons(home, "--workers", "0")
    code = (
        "import sys, time\n"
        "from loradrop.cli import main\n"
        "start = time.monotonic()\n"
        f"assert main(['status', '--connect', {d.connect!r}]) == 0\n"
        f"assert main(['jobs', '--connect', {d.connect!r}]) == 0\n"
        "elapsed = time.monotonic() - start\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(elapsed)\n"
    )
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.strip().splitlines()[-1]) < 1.0
    assert time.monotonic() - start < 5.0  # interpreter start and imports included


def test_no_daemon_is_one_clear_sentence(tmp_path):
    run = loradrop("jobs", connect=f"unix:{tmp_path / 'nothing.sock'}")
    assert run.returncode == 2
    assert "cannot reach the daemon" in run.stderr and "Traceback" not in run.stderr
