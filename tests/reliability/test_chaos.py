"""The chaos run, short: jobs trained while the worker or the whole daemon is SIGKILLed at
seeded random points (with Ray, the actors, their nodes and the daemon), then every invariant of
bench/chaos.py (done jobs equal an uninterrupted run bit for bit, failed ones say why, no partial
file listed, no orphan worker, a consistent database, no event lost). `make chaos` runs the long
version of both.

LORADROP_CHAOS_JOBS, LORADROP_CHAOS_KILLS and LORADROP_CHAOS_SEED change the run."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from bench.chaos import run_chaos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(ray: bool, kills: int, seed: int, steps: int = 5):
    jobs = int(os.environ.get("LORADROP_CHAOS_JOBS", "3"))
    kills = int(os.environ.get("LORADROP_CHAOS_KILLS", kills))
    seed = int(os.environ.get("LORADROP_CHAOS_SEED", seed))
    root = Path(tempfile.mkdtemp(prefix="ldc-", dir="/tmp"))
    try:
        report = run_chaos(root, jobs=jobs, kills=kills, seed=seed, steps=steps, ray=ray)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(report)
    assert not report.violations, "\n".join(report.violations)
    assert report.done + report.failed == jobs
    kills = (
        report.worker_kills
        + report.worker_freezes
        + report.node_kills
        + report.daemon_kills
        + report.daemon_stops
    )
    assert kills >= 1, "no kill happened: the run tested nothing"
    return report


def test_jobs_survive_random_kills_of_the_worker_and_the_daemon():
    report = _run(ray=False, kills=4, seed=20240611)
    assert report.done >= 1, (
        f"no job finished, so none was compared with its uninterrupted run: {report.failures}"
    )
    assert report.listed_files > 0 and report.events_followed > 0


def test_jobs_survive_random_kills_of_ray_actors_nodes_and_the_daemon():
    pytest.importorskip("ray")
    # This seed draws each kind of kill once (a node killed, the daemon killed, an actor frozen,
    # the daemon stopped, an actor killed); longer jobs, as two nodes train at once.
    report = _run(ray=True, kills=5, seed=107, steps=15)
    assert report.done >= 1, f"no job finished on the cluster: {report.failures}"
    assert report.listed_files > 0 and report.events_followed > 0
