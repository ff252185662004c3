"""The worker process: the only part of the daemon that imports torch.

The supervisor starts it with the spawn method (a fresh interpreter; a fork of the threaded gRPC
process could deadlock) and talks to it over one pipe. A training worker holds one engine
`Session` for its life, so the base model stays loaded between jobs; a tool worker runs the LoRA
file operations (block layout, chop, resize) that also need torch.

The messages both ways are the records of daemon/pipe.py.

The worker dies with the daemon: when the pipe reports end-of-file (the daemon exited, even by
kill -9), the reader thread ends the process at once. A third thread beats every HEARTBEAT
seconds, so the daemon can tell a frozen worker (stopped, hung) from a busy one.

Previews share the training worker with the running job by a bounded share of its time: each
time the job reaches a step boundary, the preview renders denoising steps for at most
PREVIEW_SHARE of the time the last training step took (one at least), then training goes on.
Without a job, a preview renders straight through. Either way it stops between two denoising
steps when its caller goes away (cancel_call), and reports its progress.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import math
import os
import queue
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from loradrop.engine.events import Cancelled, Lendable, Log, Progress
from loradrop.errors import UserError

from .pipe import (
    CANCELLED,
    DONE,
    FAILED,
    REVIEW,
    STOPPED,
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
    Run,
    Steer,
    Stop,
    ToWorker,
    printable_record,
)
from .records import JobFiles

log = logging.getLogger(__name__)

TRAIN, TOOL = "train", "tool"
HEARTBEAT = 2.0  # seconds between beats; the daemon's deadline (--heartbeat-seconds) is far longer
PREVIEW_SHARE = 0.25  # of the last training step's time, given to a preview at each step boundary


def main(conn, role: str, device: str | None) -> None:
    # Ctrl-C in the daemon's terminal and a SIGTERM to the whole process group reach the worker
    # too; the daemon decides when it stops (it asks over the pipe, so the job is requeued).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Worker(conn, role, device).serve()


class JobControl:
    """The engine's `Control` for one job: requests from the daemon, read at step boundaries."""

    def __init__(self, job_id: str, worker: "Worker"):
        self.job_id = job_id
        self._worker = worker
        self._lock = threading.Lock()
        self._requests: set[str] = set()
        self.cancelled = False
        self.stopping = False

    def request(self, what: str) -> None:
        with self._lock:
            if what == "cancel":
                self.cancelled = True
            elif what == "stop":
                self.stopping = True
            else:
                self._requests.add(what)

    def poll(self, lend: Lendable | None = None) -> set[str]:
        self._worker.serve_calls(lend)  # previews asked for while the job trains use its loaded model
        self.check()
        with self._lock:
            got, self._requests = self._requests, set()
            return got

    def check(self) -> None:
        if self.cancelled or self.stopping:
            raise Cancelled()


class ProgressCoalescer:
    """Progress comes as fast as the engine makes it (resize reports every module: hundreds in a
    second); clients need a few per second. A progress event is kept when its stage changes, when
    it is the stage's last (done == total), or `interval` seconds after the last one kept."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._stage: str | None = None
        self._sent = 0.0

    def keep(self, progress: Progress, now: float) -> bool:
        if (
            progress.stage == self._stage
            and progress.done != progress.total
            and now - self._sent < self.interval
        ):
            return False
        self._stage, self._sent = progress.stage, now
        return True


class Worker:
    def __init__(self, conn, role: str, device: str | None):
        self.conn, self.role, self.device = conn, role, device
        self._send_lock = threading.Lock()
        self._tasks: queue.Queue = queue.Queue()
        self._control: JobControl | None = None
        self.session = None
        self._captions = None  # the caption stage, with the captioner it loaded, made on the first job
        self._previews: collections.deque[_Preview] = collections.deque()  # begun, not yet rendered
        self._cancelled_calls: set[int] = set()
        self._resumed: float | None = None  # when the running job's current step began
        self._stopping = False  # the daemon asked this worker to stop

    def send(self, message: FromWorker) -> None:
        message = printable_record(message)  # the store and the wire take only valid text
        with self._send_lock:
            self.conn.send(message)

    def serve(self) -> None:
        threading.Thread(target=self._read, name="worker-pipe", daemon=True).start()
        threading.Thread(target=self._beat, name="worker-heartbeat", daemon=True).start()
        if self.role == TRAIN:
            try:
                from loradrop.engine.session import Session

                self.session = Session(device=self.device)
            except Exception as e:
                self.send(Fatal(_describe(e)))
                raise
        self.send(Ready(os.getpid()))
        while True:
            while self._previews:  # without a job, a preview renders straight through
                self._advance_preview(math.inf)
            task = self._tasks.get()
            if task is None:
                return
            if isinstance(task, _Job):
                self._run(task.run, task.control)
            else:
                self._call(task)

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT)
            try:
                self.send(Beat())
            except OSError:
                return  # the pipe is gone; the reader ends the process

    def _read(self) -> None:
        while True:
            try:
                message: ToWorker = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the daemon is gone: no orphan keeps the GPU
            match message:
                case Run():
                    self._control = JobControl(message.spec.job_id, self)
                    self._tasks.put(_Job(message, self._control))
                case Steer(job_id, request):
                    control = self._control
                    if control is not None and control.job_id == job_id:
                        control.request(request)
                case CancelCall(call_id):
                    self._cancelled_calls.add(call_id)
                case Stop():
                    self._stopping = True
                    if self._control is not None:
                        self._control.request("stop")
                    self._tasks.put(None)
                case _:
                    self._tasks.put(message)

    def serve_calls(self, lend: Lendable | None) -> None:
        """Between two steps of the running job (its `poll`): begin the calls that arrived, and
        give the current preview its share of the time the last step took, with the job's
        adapters (`lend`) set aside meanwhile."""
        now = time.monotonic()
        step = 0.0 if self._resumed is None else now - self._resumed
        deferred = []
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if isinstance(task, Call):
                self._call(task)
            else:
                deferred.append(task)
        for task in deferred:
            self._tasks.put(task)
        if self._previews:
            self._advance_preview(PREVIEW_SHARE * step, lend)
        self._resumed = time.monotonic()

    # ------------------------------------------------------------------ jobs

    def _run(self, run: Run, control: JobControl) -> None:
        from .security import refuse_links_out

        spec = run.spec
        coalesce = ProgressCoalescer()

        def emit(body) -> None:
            now = time.time()
            if isinstance(body, Progress) and not coalesce.keep(body, now):
                return
            self.send(JobEvent(spec.job_id, body, now))

        self._resumed = None
        try:
            refuse_links_out(spec.dataset, Path(run.inbox))
            if self._caption(spec, run.captions, emit, control):
                done = Done(spec.job_id, REVIEW)
            else:
                result = self.session.run(spec, emit, control)
                files = JobFiles(
                    *(str(p) if p else "" for p in (result.final, result.resized, result.chopped)),
                    steps_done=result.steps_done,
                )
                done = Done(spec.job_id, DONE, result=files)
        except Cancelled:
            done = Done(spec.job_id, STOPPED if control.stopping else CANCELLED)
        except UserError as e:
            done = Done(spec.job_id, FAILED, str(e))
        except Exception as e:
            sentence = _file_trouble(
                e, spec.out_dir, "retry the job (it resumes from its last full checkpoint)"
            )
            if sentence is None:
                emit(Log(traceback.format_exc(), "error"))
            done = Done(spec.job_id, FAILED, sentence or _describe(e))
        self._control = None
        self.send(done)

    def _caption(self, spec, settings, emit, control: JobControl) -> bool:
        """The caption stage before the engine's scan; True when the job is to wait for review."""
        from .caption_stage import CaptionStage

        if self._captions is None:
            self._captions = CaptionStage(self.device)
        extension = spec.recipe.get("caption_extension", ".txt")
        return self._captions.run(spec.dataset, settings, extension, emit, control.check)

    # ------------------------------------------------------------------ calls

    def _call(self, call: Call) -> None:
        from . import tools

        try:
            if call.name == "preview":  # begun here, rendered by _advance_preview
                report = _Reporter(lambda progress: self.send(CallProgress(call.id, progress)))
                self._previews.append(
                    _Preview(call.id, tools.start_preview(self.session, progress=report, **call.args))
                )
                return
            self._reply(call.id, True, getattr(tools, call.name)(**call.args))
        except UserError as e:
            self._reply(call.id, False, str(e), user=True)
        except Exception as e:
            self._failed(call.id, call.name, e)

    def _advance_preview(self, seconds: float, lend: Lendable | None = None) -> None:
        preview = self._previews[0]

        def check() -> None:
            if preview.id in self._cancelled_calls or self._stopping:
                raise Cancelled()

        try:
            preview.render.advance(seconds, check, lend)
            if not preview.render.finished:
                return
            self._reply(preview.id, True, [str(p) for p in preview.render.paths])
        except Cancelled:
            self._reply(preview.id, False, "the preview was cancelled.", user=True)
        except UserError as e:
            self._reply(preview.id, False, str(e), user=True)
        except Exception as e:
            self._failed(preview.id, "preview", e)
        self._previews.popleft()
        self._cancelled_calls.discard(preview.id)

    def _reply(self, call_id: int, ok: bool, value: Any, *, user: bool = False, space: bool = False) -> None:
        self.send(
            Reply(call_id, True, value) if ok else Reply(call_id, False, error=value, user=user, space=space)
        )

    def _failed(self, call_id: int, name: str, e: Exception) -> None:
        sentence = _file_trouble(e, None, "ask again")
        if sentence is None:
            log.exception("call %s failed", name)
        self._reply(call_id, False, sentence or _describe(e), space=_no_space(e))


@dataclasses.dataclass(frozen=True)
class _Job:
    run: Run
    control: JobControl


@dataclasses.dataclass(frozen=True)
class _Preview:
    id: int
    render: Any  # the engine's PreviewRender


class _Reporter:
    """A preview's progress, a few reports a second, and always an image's last step."""

    def __init__(self, send, interval: float = 0.2):
        self._send, self._interval, self._sent = send, interval, 0.0

    def __call__(self, progress) -> None:
        now = time.monotonic()
        if progress.step == progress.steps or now - self._sent >= self._interval:
            self._sent = now
            self._send(progress)


def _no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _file_trouble(e: BaseException, folder: Path | None, then: str) -> str | None:
    """One sentence for a write the disk refused (full, read-only, not permitted); None for
    any other error."""
    if not isinstance(e, OSError) or e.errno not in (
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
    ):
        return None
    where = folder or (Path(os.fsdecode(e.filename)).parent if e.filename else None)
    if _no_space(e):
        return f"disk full: no space left on the disk{f' holding {where}' if where else ''}; free some and {then}."
    return f"cannot write{f' {where}' if where else ''} ({e.strerror}); make the daemon's outputs folder writable and {then}."


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
