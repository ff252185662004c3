"""The client commands against a real daemon: they answer fast and load no torch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from loradrop.testing import make_dataset

pytestmark = pytest.mark.timeout(120)


def loradrop(*args: str, connect: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    where = ["--connect", connect] if connect else []
    return subprocess.run(
        [sys.executable, "-m", "loradrop", *args, *where],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_client_commands_drive_the_queue(home, daemons, tmp_path):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    source = make_dataset(tmp_path / "cats")

    submitted = loradrop(
        "submit", str(source), "--set", "max_train_steps=3", "--name", "tabby", connect=d.connect
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id == "0001-tabby" and (home / "inbox" / "cats").is_dir()

    listed = loradrop("jobs", connect=d.connect)
    assert listed.returncode == 0 and "0001-tabby" in listed.stdout and "queued" in listed.stdout

    cancelled = loradrop("cancel", "1", connect=d.connect)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    assert "has already ended" in loradrop("cancel", job_id, connect=d.connect).stderr

    # (after the cancel: a folder that is still queued is not queued a second time)
    in_place = loradrop("submit", str(home / "inbox" / "cats"), "--name", "again", connect=d.connect)
    assert in_place.stdout.strip() == "0002-again", in_place.stderr
    assert sorted(p.name for p in (home / "inbox").iterdir()) == ["cats"]  # used in place, not copied

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


def test_every_client_command_finds_the_daemon_by_its_home(home, daemons):
    d = daemons(home, "--workers", "0", "--quiet-seconds", "60")
    make_dataset(home / "inbox" / "cats")
    assert loradrop("submit", str(home / "inbox" / "cats"), "--home", str(home)).stdout.strip() == "0001-cats"
    by_env = {"LORADROP_HOME": str(home)}
    for args in (["jobs"], ["status"], ["logs", "1"]):
        for run in (loradrop(*args, "--home", str(home)), loradrop(*args, env=by_env)):
            assert run.returncode == 0, (args, run.stderr)
    assert "cancelled" in loradrop("cancel", "1", "--home", str(home)).stdout
    assert "queued" in loradrop("retry", "1", env=by_env).stdout
    assert "has no samples yet" in loradrop("montage", "1", env=by_env).stderr  # it asked the daemon
    both = loradrop("jobs", "--home", str(home), connect=d.connect)
    assert both.returncode == 2 and "not allowed with" in both.stderr
    assert "--home" in loradrop("tui", "--help").stdout


def test_no_daemon_is_one_sentence_naming_the_socket_and_the_fix(tmp_path):
    run = loradrop("jobs", "--home", str(tmp_path / "elsewhere"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    socket = tmp_path / "elsewhere" / "daemon.sock"
    assert run.stderr.strip() == (
        f"loradrop: cannot reach the daemon at {socket} (no such socket); "
        f"start one with `loradrop daemon --home {tmp_path / 'elsewhere'}`, or name another with --home or --connect."
    )
    forwarded = loradrop("status", connect=f"unix:{tmp_path / 'gpu-box.sock'}")
    assert "is the daemon, or the ssh tunnel to it, running?" in forwarded.stderr
    default = loradrop("jobs", env={"LORADROP_HOME": str(tmp_path / "mine")})
    assert "start one with `loradrop daemon`," in default.stderr  # its own default home: no --home to add


def test_jobs_knows_the_apis_states():
    from loradrop.commands.jobs import STATE_NAMES
    from loradrop.proto.client import STATES

    assert set(STATE_NAMES) == set(STATES)
