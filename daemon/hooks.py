"""`--on-job-end CMD`: a shell command run when a job ends, so a user can wire notifications.

It runs in the background, for every job that ends (done, failed or cancelled, also one refused
or cancelled before it started), with the job in its environment; its output goes to the daemon's
log. Each runs in a process group of its own, for at most `seconds` (then the group is ended:
SIGTERM, and SIGKILL 5 s later), and none outlives the daemon: a clean stop ends them all, and
where coreutils' `timeout` is installed it holds the time limit even after a kill -9 of the daemon.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

from .records import Job
from .store import Store

log = logging.getLogger(__name__)

KILL_AFTER = 5.0  # seconds between SIGTERM and SIGKILL for a command that overran


def job_env(job: Job, artifacts: list[str]) -> dict[str, str]:
    return {
        "LORADROP_JOB_ID": job.id,
        "LORADROP_JOB_STATE": job.state,
        "LORADROP_JOB_NAME": job.name,
        "LORADROP_JOB_ERROR": job.error,
        "LORADROP_ARTIFACTS": "\n".join(artifacts),
        "LORADROP_FINAL": job.result.final,
        "LORADROP_RESIZED": job.result.resized,
        "LORADROP_CHOPPED": job.result.chopped,
    }


class JobEndCommand:
    """Runs the command for each job that ends; the daemon's EventLog calls it."""

    def __init__(self, command: str, store: Store, log_path: Path, seconds: float = 300.0):
        self.command, self.store, self.log_path, self.seconds = command, store, log_path, seconds
        self._running: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._timeout = shutil.which("timeout")

    def __call__(self, job: Job) -> None:
        artifacts = [e.body.path for e in self.store.job_events(job.id, "artifact")]
        env = {**os.environ, **job_env(job, artifacts)}
        argv = ["/bin/sh", "-c", self.command]
        if self._timeout:  # keeps the limit even if the daemon itself is killed
            argv = [self._timeout, "--kill-after", f"{KILL_AFTER:g}", f"{self.seconds:g}", *argv]
        with self._lock:
            if self._stopping:
                return
            try:
                with open(self.log_path, "ab") as out:
                    process = subprocess.Popen(
                        argv,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                        start_new_session=True,
                    )
            except OSError as e:
                log.error("--on-job-end could not run for job %s: %s", job.id, e)
                return
            self._running[process.pid] = process
        threading.Thread(
            target=self._reap, args=(job, process), name=f"on-job-end-{job.id}", daemon=True
        ).start()

    def _reap(self, job: Job, process: subprocess.Popen) -> None:
        try:
            code = process.wait(self.seconds + KILL_AFTER + 1)
        except subprocess.TimeoutExpired:  # no `timeout` here, or it was stopped: end the group ourselves
            _end_group(process)
            code = process.wait()
        with self._lock:
            self._running.pop(process.pid, None)
        if code in (124, 137, -signal.SIGTERM, -signal.SIGKILL) and not self._stopping:
            log.warning("--on-job-end for job %s ran past %g s and was ended", job.id, self.seconds)
        elif code and not self._stopping:
            log.warning("--on-job-end for job %s exited with code %d", job.id, code)

    def stop(self) -> None:
        """End every command still running (the daemon stops); start no more."""
        with self._lock:
            self._stopping = True
            running = list(self._running.values())
        for process in running:
            _end_group(process)


def _end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL if it is still there KILL_AFTER later."""
    for sig, wait in ((signal.SIGTERM, KILL_AFTER), (signal.SIGKILL, 1.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
