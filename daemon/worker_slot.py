"""One worker process and the thread here that owns its pipe.

The thread hands the worker the next queued job, passes on the events it reports, and notices
when the process dies; what that means for the job is the policy's (daemon/job_policy.py). A worker
beats every HEARTBEAT seconds from a thread of its own, whatever its job is doing (a slow step
never misses a beat); one silent for --heartbeat-seconds is frozen (SIGSTOP, a hung driver) and
is killed, which resumes its job like any death, the reason in the job's log. When the daemon
kills a worker itself (frozen, or not stopped in time), the log says so, not "killed by SIGKILL".
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import wait
from typing import Any, Callable, Protocol

from loradrop.engine.events import Log, PreviewProgress

from . import worker
from .errors import DiskFull, Unavailable
from .job_policy import JobPolicy
from .pipe import (
    Beat,
    Call,
    CallProgress,
    CancelCall,
    Done,
    Fatal,
    FromWorker,
    JobEvent,
    Ready,
    Reply,
    Steer,
    Stop,
)

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")  # never fork the threaded gRPC process


class Launched(Protocol):
    """A started worker, wherever it runs: a local process here, a Ray actor (daemon/ray_slot.py)."""

    conn: Any  # the daemon's end of the pipe: send, poll, recv, fileno, close
    pid: int
    sentinel: int  # readable once the worker is gone
    where: str  # the machine it runs on, for status ("" for this one)

    def is_alive(self) -> bool: ...
    def kill(self) -> None: ...
    def ended(self) -> str: ...  # how it ended, the end of a sentence ("the worker …")
    def offers(self, pin: str) -> bool: ...  # may it run a job pinned to `pin` (loradrop.toml)


Launch = Callable[[str, str, str], Launched]  # (role, device, name) -> a started worker


class LocalProcess:
    """A worker process spawned on this machine."""

    where = ""

    def __init__(self, role: str, device: str, name: str):
        parent, child = _SPAWN.Pipe()
        self._process = _SPAWN.Process(target=worker.main, args=(child, role, device), name=name)
        self._process.start()
        child.close()  # only the worker holds its end, so the worker sees EOF when the daemon dies
        self.conn, self.pid, self.sentinel = parent, self._process.pid, self._process.sentinel

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def kill(self) -> None:
        self._process.kill()

    def ended(self) -> str:
        self._process.join(5)
        return describe_exit(self._process.exitcode)

    def offers(self, pin: str) -> bool:
        return True  # pins name a cluster's resources; one machine runs every job


def describe_exit(code: int | None) -> str:
    """How a process ended, as the end of a sentence ("the worker …")."""
    if code is None or code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = {signal.SIGKILL: " (out of memory, or killed)", signal.SIGSEGV: " (a crash in native code)"}.get(
        -code, ""
    )
    return f"was killed by {name}{hint}"


class WorkerSlot:
    """One worker process and the thread that talks to it."""

    def __init__(self, policy: JobPolicy, index: int, device: str, role: str, launch: Launch = LocalProcess):
        self.policy, self.index, self.device, self.role = policy, index, device, role
        self._launch = launch
        self.process: Launched | None = None
        self.conn = None
        self.retired = False  # the cluster shrank: this slot ends once its worker is idle
        self.pid = 0
        self.state = "stopped"
        self.job_id: str | None = None
        self._lock = threading.Lock()  # guards the pipe's sending end and the job assignment
        self._calls: dict[int, Future] = {}
        self._progress: dict[int, Callable[[PreviewProgress], None]] = {}
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
            if self._thread is not None or self.policy.stopping:
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
        return {
            "index": self.index,
            "device": self.device,
            "pid": self.pid if self.process else 0,
            "state": self.state,
            "job_id": self.job_id or "",
            "node": self.process.where if self.process else "",
        }

    def control(self, job_id: str, request: str) -> bool:
        with self._lock:
            if self.job_id != job_id or self.conn is None:
                return False
            self.conn.send(Steer(job_id, request))
            return True

    def call(
        self, name: str, args: dict[str, Any], progress: Callable[[PreviewProgress], None] | None = None
    ) -> tuple[int, Future]:
        future: Future = Future()
        with self._lock:
            if self.conn is None:
                raise Unavailable(f"the {self.role} worker is restarting; try again in a moment.")
            self._next_call += 1
            self._calls[self._next_call] = future
            if progress is not None:
                self._progress[self._next_call] = progress
            self.conn.send(Call(self._next_call, name, args))
            return self._next_call, future

    def cancel_call(self, call_id: int) -> None:
        with self._lock:
            self._progress.pop(call_id, None)
            if self.conn is not None and call_id in self._calls:
                try:
                    self.conn.send(CancelCall(call_id))
                except OSError:
                    pass  # gone: the call ends with it

    def ask_stop(self) -> None:
        with self._lock:
            if self.conn is not None:
                try:
                    self.conn.send(Stop())
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
            why = (
                "the daemon was told to stop a second time"
                if hurry.is_set()
                else f"it did not stop within {grace:g} s of being asked"
            )
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

    @property
    def ended(self) -> bool:
        """Retired, and its thread is done."""
        return self.retired and self._thread is not None and not self._thread.is_alive()

    def retire(self) -> None:
        """End this slot once its worker has no job (the cluster has fewer GPUs than slots)."""
        self.retired = True
        self.wake()

    def _spawn(self) -> None:
        process = self._launch(self.role, self.device, f"loradrop-{self.role}-{self.index}")
        self.process, self.conn, self.pid, self.state = process, process.conn, process.pid, "starting"
        self._heard, self._kill_reason = time.monotonic(), None

    def _loop(self) -> None:
        while True:
            if self.retired and self.job_id is None:
                self._end_retired()
                return
            if self.process is None:
                if self.policy.stopping or self.policy.stopped.wait(
                    min(30.0, 2.0**self._failures) if self._failures else 0
                ):
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
            elif silent > self.policy.config.heartbeat_seconds and self._kill_reason is None:
                log.error(
                    "worker %d (pid %d) sent nothing for %.0f s; killing it", self.index, self.pid, silent
                )
                self.kill(
                    f"did not answer for {self.policy.config.heartbeat_seconds:g} s (stopped or frozen), so the daemon killed it"
                )
            elif (
                self.role == worker.TRAIN
                and self.state == "idle"
                and not self.policy.stopping
                and not self.retired
            ):
                try:
                    self._take_job()
                except DiskFull as e:  # nothing was claimed; the next turn tries again
                    self._once(f"{e}; no job can start until there is space")
                except OSError:  # the worker went away as it was handed the job: the next turn sees it die
                    pass

    def _receive(self) -> None:
        try:
            while self.conn.poll():
                message = self.conn.recv()
                self._heard = time.monotonic()
                try:
                    self._handle(message)
                except (
                    DiskFull
                ) as e:  # an event lost to a full disk; the state changes are not (job_ended retries)
                    self._once(f"{e}; worker {self.index}'s events are not stored until there is space")
                except Exception as e:  # one message the store could not take must not end this thread, and the worker's queue with it
                    self._once(
                        f"worker {self.index}: message {type(message).__name__} could not be handled ({type(e).__name__}: {e})"
                    )
        except (EOFError, OSError):
            pass  # the worker is gone; the caller sees it by its exit

    def _once(self, text: str) -> None:
        """Log an error once, not for every message while it lasts."""
        if text != self._last_error:
            log.error("%s", text)
            self._last_error = text

    def _handle(self, message: FromWorker) -> None:
        match message:
            case JobEvent(job_id, body, at):
                self.policy.event(job_id, body, at)
            case Done():
                with self._lock:
                    self.job_id, self.state = None, "idle"
                self.policy.ended(message)
            case Beat():
                pass
            case CallProgress(call_id, progress):
                report = self._progress.get(call_id)
                if report is not None:
                    report(progress)
            case Reply(call_id, ok, value, error, user, space):
                self._progress.pop(call_id, None)
                future = self._calls.pop(call_id, None)
                if future is not None:
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(CallFailed(error, user, space))
            case Ready(pid):
                self.state, self.pid, self._failures = ("busy" if self.job_id else "idle"), pid, 0
            case Fatal(error):
                self.policy.daemon_log(f"worker {self.index} ({self.device}) cannot start: {error}")

    def _take_job(self) -> None:
        with self._lock:
            run = self.policy.next_run(self.process.offers)
            if run is None:
                return
            self.job_id, self.state = run.spec.job_id, "busy"
            if self.process.where:
                self.policy.event(run.spec.job_id, Log(f"runs on node {self.process.where}"), time.time())
            self.conn.send(run)

    def _end_retired(self) -> None:
        with self._lock:
            process, conn = self.process, self.conn
            self.process, self.conn, self.state = None, None, "stopped"
        if conn is not None:
            conn.close()
        if process is not None:
            self._kill_reason = "was retired: the cluster has fewer GPUs now"
            process.kill()

    def _died(self) -> None:
        reason = self._kill_reason or self.process.ended()
        with self._lock:
            job_id, calls, was_ready = self.job_id, self._calls, self.state != "starting"
            self.conn.close()
            self.process, self.conn, self.job_id, self._calls, self.state = None, None, None, {}, "stopped"
            self._progress = {}
        for future in calls.values():
            future.set_exception(Unavailable(f"the {self.role} worker {reason}; try again."))
        if job_id:
            self.policy.crashed(job_id, reason)
        if self.policy.stopping:
            return
        self._failures = 0 if was_ready else self._failures + 1
        what = "died" if was_ready else "could not start"
        self.policy.daemon_log(f"worker {self.index} ({self.device}) {what}: it {reason}; starting a new one")


class CallFailed(Exception):
    """A worker's call raised; `user` when it was the caller's mistake (a UserError), `space`
    when the disk was full."""

    def __init__(self, message: str, user: bool, space: bool = False):
        super().__init__(message)
        self.user, self.space = user, space
