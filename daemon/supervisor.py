"""Worker processes: one per visible GPU (one on a CPU machine) for jobs, one more for LoRA tools.

Each worker has a thread here that owns its pipe: it hands the worker the next queued job,
stores the events the worker reports, and notices when the process dies. A death fails the job
with the reason or queues it again to resume from its last checkpoint (up to --max-retries); a
new worker is started and the queue goes on.

A worker beats every HEARTBEAT seconds from a thread of its own, whatever its job is doing (a
slow step never misses a beat); one silent for --heartbeat-seconds is frozen (SIGSTOP, a hung
driver) and is killed, which resumes its job like any death, the reason in the job's log. When
the daemon kills a worker itself (frozen, or not stopped in time), the log says so, not "killed
by SIGKILL". A job's end that the store cannot record (a full disk) is tried again until it is.
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
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

from loradrop.fsutil import sweep_partials

from . import worker
from .config import DaemonConfig
from .errors import DiskFull, Unavailable
from .events import EventLog
from .home import Home
from .store import CANCELLED, DONE, FAILED, QUEUED, REVIEW, RUNNING, Job

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")  # never fork the threaded gRPC process
STOP_GRACE = 30.0  # seconds a stopping worker has to reach a step (or denoising) boundary


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
        self._hurry = threading.Event()  # a second stop signal: kill what has not stopped yet
        self._cancelling: set[str] = set()

    def start(self) -> None:
        for job in self.events.store.jobs([RUNNING]):  # left running by a daemon that died
            self.events.transition(job.id, QUEUED, expect=(RUNNING,))
            self.events.emit(job.id, "log", {"level": "warning", "text": "the daemon stopped while this job ran; it resumes from its last full checkpoint"})
        self.sweep(self.home.outputs, self.home.cache)
        for slot in self.trainers:
            slot.start()

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Ask every worker to stop at its next step boundary (the job is queued again and
        resumes on the next start); kill those that have not stopped after `grace` seconds, or
        at once on `hurry`."""
        self.stopping = True
        self.stopped.set()
        slots = [*self.trainers, self.tools]
        for slot in slots:
            slot.ask_stop()
        deadline = time.monotonic() + grace
        for slot in slots:
            slot.join(deadline, self._hurry, grace)

    def hurry(self) -> None:
        """A second stop signal while stopping: workers still busy are killed now."""
        self._hurry.set()

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

    def call(self, name: str, args: dict[str, Any], timeout: float, *, progress: Callable[[dict], None] | None = None,
             cancelled: Callable[[], bool] = lambda: False) -> Any:
        """Run a tool function in a worker: previews where the model is loaded, the rest in the
        tool worker, so they never wait for a training step. `progress` hears the worker's
        reports; once `cancelled()` (the client went away) the worker is told to stop."""
        if name == "preview":
            if not self.trainers:
                raise Unavailable("this daemon runs no training worker (--workers 0), so it cannot render previews.")
            slot = min(self.trainers, key=lambda s: s.state != "idle")
        else:
            slot = self.tools
            slot.start()
        call_id, future = slot.call(name, args, progress)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return future.result(min(0.5, max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                if cancelled():
                    slot.cancel_call(call_id)
                    raise Unavailable(f"the {name} was cancelled.") from None
                if time.monotonic() >= deadline:
                    slot.cancel_call(call_id)
                    raise

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
            "captions": job.captions or {},  # the caption stage's settings, run by the worker before the engine's scan
            "cache_dir": str(self.home.cache),
            "resume": True,  # a job's out_dir is its own: a checkpoint there is from an earlier try
            "inbox": str(self.home.inbox),  # the worker checks the folder's links again before reading it
        }

    def job_ended(self, job_id: str, outcome: str, error: str, result: dict[str, Any]) -> None:
        self._cancelling.discard(job_id)
        if outcome == "stopped":
            self._requeue(job_id, "the daemon is stopping; this job resumes from its last full checkpoint on the next start")
            return
        if outcome == REVIEW:  # captioned, held for a person: the worker is free for the next job meanwhile
            self._quietly(lambda: self.events.emit(job_id, "log", {"level": "info", "text": f"captions written; the job waits for review: look them over, then `loradrop accept {job_id}`"}))
            self._lasting(lambda: self.events.transition(job_id, REVIEW, expect=(RUNNING,)), f"that job {job_id} waits for review")
            return
        if outcome == DONE:
            self._lasting(lambda: self.events.store.set_result(job_id, result), f"the result of job {job_id}")
        state = {DONE: DONE, CANCELLED: CANCELLED}.get(outcome, FAILED)
        self._lasting(lambda: self.events.transition(job_id, state, error=error, expect=(RUNNING,)), f"that job {job_id} ended ({state})")

    def job_crashed(self, job_id: str, reason: str) -> None:
        if self.stopping:
            self._requeue(job_id, f"the worker {reason}; this job resumes from its last full checkpoint on the next start")
            return
        if job_id in self._cancelling:
            self._cancelling.discard(job_id)
            self._lasting(lambda: self.events.transition(job_id, CANCELLED, error=f"the worker {reason} while cancelling", expect=(RUNNING,)), f"that job {job_id} was cancelled")
            return
        job = self.events.store.get(job_id)
        if job is not None and job.attempts < self.config.max_retries:
            tries = job.attempts + 1
            self._quietly(lambda: self.events.emit(job_id, "log", {"level": "warning", "text": f"the worker {reason}; resuming from the last full checkpoint (retry {tries} of {self.config.max_retries})"}))
            self._lasting(lambda: self.events.transition(job_id, QUEUED, expect=(RUNNING,), attempts=tries), f"that job {job_id} goes back to the queue")
            self.wake()
            return
        self._lasting(lambda: self.events.transition(job_id, FAILED, error=f"the worker {reason}", expect=(RUNNING,)), f"that job {job_id} failed")

    def _lasting(self, write: Callable[[], Any], what: str) -> None:
        """A state change must not be lost to a full disk: tried again until the store takes it
        (the store gives sqlite its reserve first, so this waits only once that is spent too)."""
        warned = False
        while True:
            try:
                write()
                return
            except DiskFull as e:
                if not warned:
                    log.error("%s; cannot record %s yet, trying again every 2 s", e, what)
                    warned = True
                if self._hurry.wait(2.0):
                    return  # a second stop signal: the job is found running at the next start, and resumes

    def _quietly(self, write: Callable[[], Any]) -> None:
        """A log line may be lost to a full disk; the daemon says so in its own log."""
        try:
            write()
        except DiskFull as e:
            log.error("%s; an event was not stored", e)

    def sweep(self, *folders: Path) -> None:
        """Remove the half-written files that killed workers left in `folders` (never listed,
        but they hold disk space); files of writers still running are left alone."""
        for folder in folders:
            removed = sweep_partials(folder)
            if removed:
                log.info("removed %d unfinished files in %s left by stopped workers", len(removed), folder)

    def _requeue(self, job_id: str, why: str) -> None:
        self._quietly(lambda: self.events.emit(job_id, "log", {"level": "warning", "text": why}))
        self._lasting(lambda: self.events.transition(job_id, QUEUED, expect=(RUNNING,)), f"that job {job_id} goes back to the queue")


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
        self._progress: dict[int, Callable[[dict], None]] = {}
        self._next_call = 0
        self._failures = 0  # deaths in a row before the worker was ready
        self._heard = time.monotonic()  # the worker's last message (a beat at least every HEARTBEAT s)
        self._kill_reason: str | None = None  # why the daemon killed the worker itself, for the job's log
        self._last_error = ""
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

    def call(self, name: str, args: dict[str, Any], progress: Callable[[dict], None] | None = None) -> tuple[int, Future]:
        future: Future = Future()
        with self._lock:
            if self.conn is None:
                raise Unavailable(f"the {self.role} worker is restarting; try again in a moment.")
            self._next_call += 1
            self._calls[self._next_call] = future
            if progress is not None:
                self._progress[self._next_call] = progress
            self.conn.send({"op": "call", "id": self._next_call, "name": name, "args": args})
            return self._next_call, future

    def cancel_call(self, call_id: int) -> None:
        with self._lock:
            self._progress.pop(call_id, None)
            if self.conn is not None and call_id in self._calls:
                try:
                    self.conn.send({"op": "cancel_call", "id": call_id})
                except OSError:
                    pass  # gone: the call ends with it

    def ask_stop(self) -> None:
        with self._lock:
            if self.conn is not None:
                try:
                    self.conn.send({"op": "stop"})
                except OSError:
                    pass  # already gone
        self.wake()

    def join(self, deadline: float, hurry: threading.Event, grace: float) -> None:
        if self._thread is None:
            return
        while self._thread.is_alive() and time.monotonic() < deadline and not hurry.is_set():
            self._thread.join(0.1)
        process = self.process
        if self._thread.is_alive() and process is not None:
            why = "the daemon was told to stop a second time" if hurry.is_set() else f"it did not stop within {grace:g} s of being asked"
            log.warning("worker %d is still busy and %s; killing it", self.index, why)
            self.kill(f"was killed by the daemon: {why} (its job had not reached a step boundary)")
            self._thread.join(10)

    def kill(self, reason: str) -> None:
        """End the worker now; `reason` (the end of a sentence, "the worker …") goes to its job's log."""
        process = self.process
        if process is not None:
            self._kill_reason = reason
            process.kill()

    # ------------------------------------------------------------------ the thread

    def _spawn(self) -> None:
        parent, child = _SPAWN.Pipe()
        process = _SPAWN.Process(target=worker.main, args=(child, self.role, self.device), name=f"loradrop-{self.role}-{self.index}")
        process.start()
        child.close()  # only the worker holds its end, so the worker sees EOF when the daemon dies
        self.process, self.conn, self.pid, self.state = process, parent, process.pid, "starting"
        self._heard, self._kill_reason = time.monotonic(), None

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
            silent = time.monotonic() - self._heard
            if not self.process.is_alive():
                self._receive()
                self._died()
            elif silent > self.sup.config.heartbeat_seconds and self._kill_reason is None:
                log.error("worker %d (pid %d) sent nothing for %.0f s; killing it", self.index, self.pid, silent)
                self.kill(f"did not answer for {self.sup.config.heartbeat_seconds:g} s (stopped or frozen), so the daemon killed it")
            elif self.role == worker.TRAIN and self.state == "idle" and not self.sup.stopping:
                try:
                    self._take_job()
                except DiskFull as e:  # nothing was claimed; the next turn tries again
                    self._once(f"{e}; no job can start until there is space")

    def _receive(self) -> None:
        try:
            while self.conn.poll():
                message = self.conn.recv()
                self._heard = time.monotonic()
                try:
                    self._handle(message)
                except DiskFull as e:  # an event lost to a full disk; the state changes are not (job_ended retries)
                    self._once(f"{e}; worker {self.index}'s events are not stored until there is space")
                except Exception as e:  # one message the store could not take must not end this thread, and the worker's queue with it
                    self._once(f"worker {self.index}: message {message.get('op')} could not be handled ({type(e).__name__}: {e})")
        except (EOFError, OSError):
            pass  # the worker is gone; the caller sees it by its exit

    def _once(self, text: str) -> None:
        """Log an error once, not for every message while it lasts."""
        if text != self._last_error:
            log.error("%s", text)
            self._last_error = text

    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "event":
            self.sup.events.emit(message["job_id"], message["kind"], message["payload"], at=message["time"])
        elif op == "done":
            with self._lock:
                self.job_id, self.state = None, "idle"
            self.sup.job_ended(message["job_id"], message["outcome"], message["error"], message["result"])
        elif op == "beat":
            pass
        elif op == "progress":
            report = self._progress.get(message["id"])
            if report is not None:
                report(message["payload"])
        elif op == "reply":
            self._progress.pop(message["id"], None)
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
        reason = self._kill_reason or describe_exit(self.process.exitcode)
        with self._lock:
            job_id, calls, was_ready = self.job_id, self._calls, self.state != "starting"
            self.conn.close()
            self.process, self.conn, self.job_id, self._calls, self.state = None, None, None, {}, "stopped"
            self._progress = {}
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
