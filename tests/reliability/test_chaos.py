"""The chaos run, short: jobs trained while the worker or the whole daemon is SIGKILLed at
seeded random points, then every invariant of bench/chaos.py (done jobs equal an uninterrupted
run bit for bit, failed ones say why, no partial file listed, no orphan worker, a consistent
database, no event lost). `make chaos` runs the long version.

LORADROP_CHAOS_JOBS, LORADROP_CHAOS_KILLS and LORADROP_CHAOS_SEED change the run."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from bench.chaos import run_chaos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_jobs_survive_random_kills_of_the_worker_and_the_daemon():
    jobs = int(os.environ.get("LORADROP_CHAOS_JOBS", "3"))
    kills = int(os.environ.get("LORADROP_CHAOS_KILLS", "4"))
    seed = int(os.environ.get("LORADROP_CHAOS_SEED", "20240611"))
    root = Path(tempfile.mkdtemp(prefix="ldc-", dir="/tmp"))
    try:
        report = run_chaos(root, jobs=jobs, kills=kills, seed=seed, steps=5)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(report)
    assert not report.violations, "\n".join(report.violations)
    assert report.done + report.failed == jobs
    assert report.worker_kills + report.worker_freezes + report.daemon_kills + report.daemon_stops >= 1, (
        "no kill happened: the run tested nothing"
    )
    assert report.done >= 1, (
        f"no job finished, so none was compared with its uninterrupted run: {report.failures}"
    )
    assert report.listed_files > 0 and report.events_followed > 0
