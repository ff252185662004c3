"""`--on-job-end CMD`: a shell command run when a job ends, so a user can wire notifications.

It runs in the background, for every job that ends (done, failed or cancelled, also one refused
or cancelled before it started), with the job in its environment; its output goes to the daemon's log.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from pathlib import Path

from .store import Job, Store

log = logging.getLogger(__name__)


def job_env(job: Job, artifacts: list[str]) -> dict[str, str]:
    return {
        "LORADROP_JOB_ID": job.id,
        "LORADROP_JOB_STATE": job.state,
        "LORADROP_JOB_NAME": job.name,
        "LORADROP_JOB_ERROR": job.error,
        "LORADROP_ARTIFACTS": "\n".join(artifacts),
        "LORADROP_FINAL": job.result.get("final") or "",
        "LORADROP_RESIZED": job.result.get("resized") or "",
        "LORADROP_CHOPPED": job.result.get("chopped") or "",
    }


class JobEndCommand:
    """Runs the command for each job that ends; the daemon's EventLog calls it."""

    def __init__(self, command: str, store: Store, log_path: Path):
        self.command, self.store, self.log_path = command, store, log_path

    def __call__(self, job: Job) -> None:
        artifacts = [e.payload["path"] for e in self.store.job_events(job.id, "artifact")]
        env = {**os.environ, **job_env(job, artifacts)}
        try:
            with open(self.log_path, "ab") as out:
                process = subprocess.Popen(self.command, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        except OSError as e:
            log.error("--on-job-end could not run for job %s: %s", job.id, e)
            return

        def reap() -> None:
            code = process.wait()
            if code:
                log.warning("--on-job-end for job %s exited with code %d", job.id, code)

        threading.Thread(target=reap, name=f"on-job-end-{job.id}", daemon=True).start()
