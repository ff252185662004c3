"""The worker process: the only part of the daemon that imports torch.

The supervisor starts it with the spawn method (a fresh interpreter; a fork of the threaded gRPC
process could deadlock) and talks to it over one pipe. A training worker holds one engine
`Session` for its life, so the base model stays loaded between jobs; a tool worker runs the LoRA
file operations (block layout, chop, resize) that also need torch.

Messages in:  run {spec} · control {job_id, request: save|sample|cancel} · call {id, name, args} · stop
Messages out: ready {pid} · fatal {error} · event {job_id, kind, payload, time} ·
              done {job_id, outcome: done|failed|cancelled|stopped, error, result} · reply {id, ok, value|error}

The worker dies with the daemon: when the pipe reports end-of-file (the daemon exited, even by
kill -9), the reader thread ends the process at once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAIN, TOOL = "train", "tool"


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

    def poll(self) -> set[str]:
        from loradrop.engine.pipeline import Cancelled

        self._worker.serve_calls()  # previews asked for while the job trains use its loaded model
        with self._lock:
            if self.cancelled or self.stopping:
                raise Cancelled()
            got, self._requests = self._requests, set()
            return got


class ProgressCoalescer:
    """Progress comes as fast as the engine makes it (resize reports every module: hundreds in a
    second); clients need a few per second. A progress event is kept when its stage changes, when
    it is the stage's last (done == total), or `interval` seconds after the last one kept."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._stage: str | None = None
        self._sent = 0.0

    def keep(self, payload: dict[str, Any], now: float) -> bool:
        stage = payload.get("stage")
        if stage == self._stage and payload.get("done") != payload.get("total") and now - self._sent < self.interval:
            return False
        self._stage, self._sent = stage, now
        return True


class Worker:
    def __init__(self, conn, role: str, device: str | None):
        self.conn, self.role, self.device = conn, role, device
        self._send_lock = threading.Lock()
        self._tasks: queue.Queue = queue.Queue()
        self._control: JobControl | None = None
        self.session = None

    def send(self, message: dict[str, Any]) -> None:
        with self._send_lock:
            self.conn.send(message)

    def serve(self) -> None:
        threading.Thread(target=self._read, name="worker-pipe", daemon=True).start()
        if self.role == TRAIN:
            try:
                from loradrop.engine.pipeline import Session

                self.session = Session(device=self.device)
            except Exception as e:
                self.send({"op": "fatal", "error": _describe(e)})
                raise
        self.send({"op": "ready", "pid": os.getpid()})
        while True:
            task = self._tasks.get()
            if task is None:
                return
            if task["op"] == "run":
                self._run(task)
            else:
                self._call(task)

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the daemon is gone: no orphan keeps the GPU
            op = message["op"]
            if op == "run":
                self._control = JobControl(message["spec"]["job_id"], self)
                self._tasks.put({**message, "control": self._control})
            elif op == "control":
                control = self._control
                if control is not None and control.job_id == message["job_id"]:
                    control.request(message["request"])
            elif op == "stop":
                if self._control is not None:
                    self._control.request("stop")
                self._tasks.put(None)
            else:
                self._tasks.put(message)

    def serve_calls(self) -> None:
        """Answer the calls that arrived while a job runs (called from its `poll`)."""
        deferred = []
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None and task["op"] == "call":
                self._call(task)
            else:
                deferred.append(task)
        for task in deferred:
            self._tasks.put(task)

    # ------------------------------------------------------------------ jobs

    def _run(self, task: dict[str, Any]) -> None:
        from loradrop.engine.pipeline import Cancelled, JobSpec
        from loradrop.errors import UserError

        from .security import refuse_links_out

        fields = dict(task["spec"])
        inbox = Path(fields.pop("inbox"))
        spec = JobSpec(**_paths(fields, ("dataset", "out_dir", "cache_dir")))
        control: JobControl = task["control"]

        coalesce = ProgressCoalescer()

        def emit(kind: str, payload: dict[str, Any]) -> None:
            now = time.time()
            if kind == "progress" and not coalesce.keep(payload, now):
                return
            self.send({"op": "event", "job_id": spec.job_id, "kind": kind, "payload": _plain(payload), "time": now})

        done = {"op": "done", "job_id": spec.job_id, "outcome": "done", "error": "", "result": {}}
        try:
            refuse_links_out(spec.dataset, inbox)
            result = self.session.run(spec, emit, control)
            done["result"] = _plain(vars(result))
        except Cancelled:
            done["outcome"] = "stopped" if control.stopping else "cancelled"
        except UserError as e:
            done.update(outcome="failed", error=str(e))
        except Exception as e:
            if _no_space(e):
                done.update(outcome="failed", error=f"no space left on the disk holding {spec.out_dir}; free some and retry the job (it resumes from its last full checkpoint).")
            else:
                emit("log", {"level": "error", "text": traceback.format_exc()})
                done.update(outcome="failed", error=_describe(e))
        self._control = None
        self.send(_plain(done))

    # ------------------------------------------------------------------ calls

    def _call(self, task: dict[str, Any]) -> None:
        from loradrop.errors import UserError

        from . import tools

        try:
            if task["name"] == "preview":
                value = tools.preview(self.session, **task["args"])
            else:
                value = getattr(tools, task["name"])(**task["args"])
            reply = {"op": "reply", "id": task["id"], "ok": True, "value": value}
        except UserError as e:
            reply = {"op": "reply", "id": task["id"], "ok": False, "user": True, "error": str(e)}
        except Exception as e:
            if _no_space(e):
                reply = {"op": "reply", "id": task["id"], "ok": False, "user": False, "space": True,
                         "error": f"no space left on the disk{f' for {e.filename}' if e.filename else ''}; free some and ask again."}
            else:
                log.exception("call %s failed", task["name"])
                reply = {"op": "reply", "id": task["id"], "ok": False, "user": False, "error": _describe(e)}
        self.send(_plain(reply))


def _paths(spec: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: (Path(v) if k in keys and v is not None else v) for k, v in spec.items()}


def _plain(value: Any) -> Any:
    """JSON-able copies of the engine's payloads (paths become strings), with file names that
    are not UTF-8 made printable: the store and the wire take only valid text."""
    from .security import printable

    return json.loads(printable(json.dumps(value, default=str, ensure_ascii=False)))


def _no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
