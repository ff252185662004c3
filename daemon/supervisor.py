"""Worker processes: one per visible GPU (one on a CPU machine) for jobs, one more for LoRA tools.

Each worker has a thread here that owns its pipe: it hands the worker the next queued job,
stores the events the worker reports, and notices when the process dies. A death fails the job
with the reason or queues it again to resume from its last checkpoint (up to --max-retries); a
new worker is started and the queue goes on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from loradrop.fsutil import sweep_partials

from . import worker
from .config import DaemonConfig
from .errors import Unavailable
from .events import EventLog
from .home import Home
from .store import CANCELLED, DONE, FAILED, QUEUED, RUNNING, Job

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")  # never fork the threaded gRPC process


def visible_devices() -> list[str]:
    """The GPUs a worker may use, without importing torch: CUDA_VISIBLE_DEVICES when set, else
    `nvidia-smi -L`; ["cpu"] when there are none."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        count = len([d for d in listed.split(",") if d.strip() and d.strip() != "-1"])
    elif shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    else:
        count = 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def describe_exit(code: int | None) -> str:
    """How a process ended, as the end of a sentence ("the worker …")."""
    if code is None or code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = {signal.SIGKILL: " (out of memory, or killed)", signal.SIGSEGV: " (a crash in native code)"}.get(-code, "")
    return f"was killed by {name}{hint}"


class Supervisor:
    def __init__(self, home: Home, config: DaemonConfig, events: EventLog):
        self.home, self.config, self.events = home, config, events
        devices = visible_devices()
        count = len(devices) if config.workers is None else config.workers
        devices = (devices * count)[:count]  # --workers beyond the GPUs share them round-robin
        self.trainers = [_Slot(self, i, device, worker.TRAIN) for i, device in enumerate(devices)]
        self.tools = _Slot(self, len(devices), "cpu", worker.TOOL)  # started on its first call
        self.stopping = False
        self.stopped = threading.Event()
        self._cancelling: set[str] = set()

    def start(self) -> None:
        for job in self.events.store.jobs([RUNNING]):  # left running by a daemon that died
            self.events.transition(job.id, QUEUED, expect=(RUNNING,))
            self.events.emit(job.id, "log", {"level": "warning", "text": "the daemon stopped while this job ran; it resumes from its last full checkpoint"})
        self.sweep(self.home.outputs, self.home.cache)
        for slot in self.trainers:
            slot.start()

    def stop(self, grace: float = 30.0) -> None:
        """Ask every worker to stop at its next step boundary (the job is queued again and
        resumes on the next start); kill those that have not stopped after `grace` seconds."""
        self.stopping = True
        self.stopped.set()
        slots = [*self.trainers, self.tools]
        for slot in slots:
            slot.ask_stop()
        deadline = time.monotonic() + grace
        for slot in slots:
            slot.join(deadline)

    def wake(self) -> None:
        for slot in self.trainers:
            slot.wake()

    def workers(self) -> list[dict[str, Any]]:
        return [slot.describe() for slot in self.trainers]

    # ------------------------------------------------------------------ requests for running jobs

    def control(self, job_id: str, request: str) -> bool:
        """Pass save/sample/cancel to the worker running the job; False if none runs it."""
        if request == "cancel":
            self._cancelling.add(job_id)
        return any(slot.control(job_id, request) for slot in self.trainers)

    def call(self, name: str, args: dict[str, Any], timeout: float) -> Any:
        """Run a tool function in a worker: previews where the model is loaded, the rest in the
        tool worker, so they never wait for a training step."""
        if name == "preview":
            if not self.trainers:
                raise Unavailable("this daemon runs no training worker (--workers 0), so it cannot render previews.")
            slot = min(self.trainers, key=lambda s: s.state != "idle")
        else:
            slot = self.tools
            slot.start()
        return slot.call(name, args).result(timeout)

    # ------------------------------------------------------------------ how jobs end

    def spec(self, job: Job) -> dict[str, Any]:
        """The engine's JobSpec, as plain values for the pipe."""
        return {
            "job_id": job.id,
            "name": job.name,
            "dataset": job.dataset,
            "out_dir": str(self.home.job_dir(job.id)),
            "recipe": job.recipe,
            "model": job.model,
            "block_vector": job.block_vector,
            "cache_dir": str(self.home.cache),
            "resume": True,  # a job's out_dir is its own: a checkpoint there is from an earlier try
            "inbox": str(self.home.inbox),  # the worker checks the folder's links again before reading it
        }

    def job_ended(self, job_id: str, outcome: str, error: str, result: dict[str, Any]) -> None:
        self._cancelling.discard(job_id)
        if outcome == "stopped":
            self._requeue(job_id, "the daemon is stopping; this job resumes from its last full checkpoint on the next start")
            return
        if outcome == DONE:
            self.events.store.set_result(job_id, result)
        state = {DONE: DONE, CANCELLED: CANCELLED}.get(outcome, FAILED)
        self.events.transition(job_id, state, error=error, expect=(RUNNING,))

    def job_crashed(self, job_id: str, reason: str) -> None:
        if self.stopping:
            self._requeue(job_id, f"the worker {reason} while the daemon stopped; this job resumes on the next start")
            return
        if job_id in self._cancelling:
            self._cancelling.discard(job_id)
            self.events.transition(job_id, CANCELLED, error=f"the worker {reason} while cancelling", expect=(RUNNING,))
            return
        job = self.events.store.get(job_id)
        if job is not None and job.attempts < self.config.max_retries:
            tries = job.attempts + 1
            self.events.emit(job_id, "log", {"level": "warning", "text": f"the worker {reason}; resuming from the last full checkpoint (retry {tries} of {self.config.max_retries})"})
            self.events.transition(job_id, QUEUED, expect=(RUNNING,), attempts=tries)
            self.wake()
            return
        self.events.transition(job_id, FAILED, error=f"the worker {reason}", expect=(RUNNING,))

    def sweep(self, *folders: Path) -> None:
        """Remove the half-written files that killed workers left in `folders` (never listed,
        but they hold disk space); files of writers still running are left alone."""
        for folder in folders:
            removed = sweep_partials(folder)
            if removed:
                log.info("removed %d unfinished files in %s left by stopped workers", len(removed), folder)

    def _requeue(self, job_id: str, why: str) -> None:
        self.events.emit(job_id, "log", {"level": "warning", "text": why})
        self.events.transition(job_id, QUEUED, expect=(RUNNING,))


class _Slot:
    """One worker process and the thread that talks to it."""

    def __init__(self, supervisor: Supervisor, index: int, device: str, role: str):
        self.sup, self.index, self.device, self.role = supervisor, index, device, role
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn = None
        self.pid = 0
        self.state = "stopped"
        self.job_id: str | None = None
        self._lock = threading.Lock()  # guards the pipe's sending end and the job assignment
        self._calls: dict[int, Future] = {}
        self._next_call = 0
        self._failures = 0  # deaths in a row before the worker was ready
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self.sup.stopping:
                return
            self._spawn()
            self._thread = threading.Thread(target=self._loop, name=f"worker-{self.index}", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # already more than enough wake-ups pending

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "device": self.device, "pid": self.pid if self.process else 0, "state": self.state, "job_id": self.job_id or ""}

    def control(self, job_id: str, request: str) -> bool:
        with self._lock:
            if self.job_id != job_id or self.conn is None:
                return False
            self.conn.send({"op": "control", "job_id": job_id, "request": request})
            return True

    def call(self, name: str, args: dict[str, Any]) -> Future:
        future: Future = Future()
        with self._lock:
            if self.conn is None:
                raise Unavailable(f"the {self.role} worker is restarting; try again in a moment.")
            self._next_call += 1
            self._calls[self._next_call] = future
            self.conn.send({"op": "call", "id": self._next_call, "name": name, "args": args})
        return future

    def ask_stop(self) -> None:
        with self._lock:
            if self.conn is not None:
                try:
                    self.conn.send({"op": "stop"})
                except OSError:
                    pass  # already gone
        self.wake()

    def join(self, deadline: float) -> None:
        if self._thread is None:
            return
        self._thread.join(max(0.0, deadline - time.monotonic()))
        process = self.process
        if self._thread.is_alive() and process is not None:
            log.warning("worker %d did not stop in time; killing it", self.index)
            process.kill()
            self._thread.join(10)

    # ------------------------------------------------------------------ the thread

    def _spawn(self) -> None:
        parent, child = _SPAWN.Pipe()
        process = _SPAWN.Process(target=worker.main, args=(child, self.role, self.device), name=f"loradrop-{self.role}-{self.index}")
        process.start()
        child.close()  # only the worker holds its end, so the worker sees EOF when the daemon dies
        self.process, self.conn, self.pid, self.state = process, parent, process.pid, "starting"

    def _loop(self) -> None:
        while True:
            if self.process is None:
                if self.sup.stopping or self.sup.stopped.wait(min(30.0, 2.0**self._failures) if self._failures else 0):
                    return
                with self._lock:
                    self._spawn()
            ready = wait([self.conn, self.process.sentinel, self._wake_r], timeout=1.0)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            self._receive()
            if not self.process.is_alive():
                self._receive()
                self._died()
            elif self.role == worker.TRAIN and self.state == "idle" and not self.sup.stopping:
                self._take_job()

    def _receive(self) -> None:
        try:
            while self.conn.poll():
                message = self.conn.recv()
                try:
                    self._handle(message)
                except Exception:  # one message the store could not take must not end this thread, and the worker's queue with it
                    log.exception("worker %d: message %s could not be handled", self.index, message.get("op"))
        except (EOFError, OSError):
            pass  # the worker is gone; the caller sees it by its exit

    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "event":
            self.sup.events.emit(message["job_id"], message["kind"], message["payload"], at=message["time"])
        elif op == "done":
            with self._lock:
                self.job_id, self.state = None, "idle"
            self.sup.job_ended(message["job_id"], message["outcome"], message["error"], message["result"])
        elif op == "reply":
            future = self._calls.pop(message["id"], None)
            if future is not None:
                if message["ok"]:
                    future.set_result(message["value"])
                else:
                    future.set_exception(CallFailed(message["error"], message["user"], message.get("space", False)))
        elif op == "ready":
            self.state, self.pid, self._failures = ("busy" if self.job_id else "idle"), message["pid"], 0
        elif op == "fatal":
            self.sup.events.emit("", "log", {"level": "error", "text": f"worker {self.index} ({self.device}) cannot start: {message['error']}"})

    def _take_job(self) -> None:
        with self._lock:
            job = self.sup.events.claim_next()
            if job is None:
                return
            self.job_id, self.state = job.id, "busy"
            self.conn.send({"op": "run", "spec": self.sup.spec(job)})

    def _died(self) -> None:
        reason = describe_exit(self.process.exitcode)
        with self._lock:
            job_id, calls, was_ready = self.job_id, self._calls, self.state != "starting"
            self.conn.close()
            self.process, self.conn, self.job_id, self._calls, self.state = None, None, None, {}, "stopped"
        for future in calls.values():
            future.set_exception(Unavailable(f"the {self.role} worker {reason}; try again."))
        if job_id:
            self.sup.sweep(self.sup.home.job_dir(job_id), self.sup.home.cache)
            self.sup.job_crashed(job_id, reason)
        if self.sup.stopping:
            return
        self._failures = 0 if was_ready else self._failures + 1
        what = "died" if was_ready else "could not start"
        self.sup.events.emit("", "log", {"level": "error", "text": f"worker {self.index} ({self.device}) {what}: it {reason}; starting a new one"})


class CallFailed(Exception):
    """A worker's call raised; `user` when it was the caller's mistake (a UserError), `space`
    when the disk was full."""

    def __init__(self, message: str, user: bool, space: bool = False):
        super().__init__(message)
        self.user, self.space = user, space
