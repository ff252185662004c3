"""One concept LoRA per test run, trained by a real daemon on the learned twin, shared by every
learning check (training it is the expensive part)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.testing import Daemon, wait_for


@dataclass
class ConceptRun:
    daemon: Daemon
    job: pb.Job
    artifacts: dict[str, str]  # kind -> path


@pytest.fixture(scope="session")
def learned_twin():
    """The embedded default model, loaded once (tests must not change its weights)."""
    from loradrop.engine.models.sdxl import load_sdxl
    from loradrop.engine.models.tiny import default_model_path

    return load_sdxl(default_model_path())


@pytest.fixture(scope="session")
def concept_run(tmp_path_factory):
    from loradrop.engine.twin.concept import write_concept_dataset

    root = Path(os.path.realpath(tmp_path_factory.mktemp("concept")))
    home = Path(tempfile.mkdtemp(prefix="ld-", dir="/tmp")) / "home"
    daemon = Daemon(home, "--quiet-seconds", "0.5", "--workers", "1", env={"OMP_NUM_THREADS": "1"}).start()
    try:
        staged = write_concept_dataset(root / "zkq-shapes", recipe={"log_with": "none"})
        os.rename(staged, home / "inbox" / staged.name)  # one atomic drop, as a user's mv
        with daemon.client() as client:
            job = wait_for(
                lambda: next(iter(client.jobs()), None), timeout=30, what="the drop to become a job"
            )
            job = client.wait_job(job.id, 600, interval=0.5)
            assert job.state == pb.DONE, f"{job.error}\n{daemon.log()}"
            artifacts = {a.kind: a.path for a in client.artifacts(job.id)}
        yield ConceptRun(daemon, job, artifacts)
    finally:
        daemon.stop()
        shutil.rmtree(home.parent, ignore_errors=True)
