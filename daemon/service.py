"""The gRPC API's methods: check the request, ask the store, the intake or a worker, answer.

Every refusal is a status code with one sentence (see errors.py); nothing here imports torch:
work that needs it is a call into a worker process.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Iterator

import grpc
import tomli_w

from loradrop import __version__
from loradrop.engine.data.prompts import parse_prompt_line
from loradrop.engine.lora.blocks import vector_tokens
from loradrop.errors import UserError
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.proto.v1 import loradrop_pb2_grpc as rpc

from .config import DaemonConfig
from .errors import Busy, Conflict, NotFound, Refused, RequestError, Unavailable
from .events import EventLog
from .home import Home
from .intake import Intake, Request
from .security import printable, resolve_inside
from .store import CANCELLED, QUEUED, RUNNING, STATES, TERMINAL, Event, Job
from .supervisor import CallFailed, Supervisor
from .watcher import InboxWatcher

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TOOL_TIMEOUT = {"blocks": 300.0, "chop": 300.0, "resize": 1800.0, "preview": 1800.0}
MAX_PREVIEW_PIXELS = 2048 * 2048
_KIND = re.compile(r"[a-z_]{1,32}")
# Open event streams each hold one of the server's threads until they end; past this many a new
# one is refused, so that plain calls always find a thread (server.RPC_THREADS is larger).
MAX_STREAMS = 100
_ERROR_CODES = [  # most specific first
    (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Refused, grpc.StatusCode.PERMISSION_DENIED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (UserError, grpc.StatusCode.INVALID_ARGUMENT),
]


def _answers(method):
    """Turn the daemon's errors into status codes, for plain and streaming methods alike."""

    def fail(e: Exception, context) -> None:
        if isinstance(e, CallFailed):
            code = grpc.StatusCode.INVALID_ARGUMENT if e.user else grpc.StatusCode.RESOURCE_EXHAUSTED if e.space else grpc.StatusCode.INTERNAL
            context.abort(code, printable(str(e)))
        if isinstance(e, FutureTimeout):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method.__name__} took too long; the worker is still busy with it.")
        for kind, code in _ERROR_CODES:
            if isinstance(e, kind):
                context.abort(code, printable(str(e)))
        log.exception("%s failed", method.__name__)
        context.abort(grpc.StatusCode.INTERNAL, printable(f"{method.__name__} failed inside the daemon ({type(e).__name__}: {e}); see daemon.log."))

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as e:
                if isinstance(e, grpc.RpcError):
                    raise
                if context.is_active():  # else the client is gone: nobody to tell
                    fail(e, context)

        return streaming

    @functools.wraps(method)
    def plain(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            if isinstance(e, grpc.RpcError):
                raise
            fail(e, context)

    return plain


class Service(rpc.LoradropServicer):
    def __init__(self, home: Home, config: DaemonConfig, events: EventLog, intake: Intake, supervisor: Supervisor, watcher: InboxWatcher):
        self.home, self.config, self.events, self.intake, self.supervisor, self.watcher = home, config, events, intake, supervisor, watcher
        self.store = events.store
        self.started = time.time()
        self.stopping = False
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)

    # ------------------------------------------------------------------ daemon and jobs

    @_answers
    def Status(self, request, context):
        return pb.StatusReply(
            version=__version__,
            pid=os.getpid(),
            started=self.started,
            home=str(self.home.root),
            inbox=str(self.home.inbox),
            outputs=str(self.home.outputs),
            models=str(self.home.models),
            default_model=self.config.model or "",
            workers=[pb.Worker(**w) for w in self.supervisor.workers()],
            jobs_by_state=self.store.counts(),
            pending_folders=self.watcher.waiting(),
            last_event_seq=self.events.top,
            quiet_seconds=self.config.quiet_seconds,
        )

    @_answers
    def SubmitJob(self, request, context):
        return self._message(self.intake.submit(request.dataset, _request(request)))

    @_answers
    def UploadDataset(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or not first.HasField("job"):
            raise RequestError("an upload must start with a message that carries the job (its folder name and settings).")
        chunks = (m.data for m in _chain(first, request_iterator))
        return self._message(self.intake.upload(_request(first.job), first.job.dataset, chunks))

    @_answers
    def ListJobs(self, request, context):
        states = [_state_name(s) for s in request.states]
        return pb.ListJobsReply(jobs=[self._message(j) for j in self.store.jobs(states)])

    @_answers
    def GetJob(self, request, context):
        return self._message(self._job(request.job_id))

    @_answers
    def CancelJob(self, request, context):
        job = self._job(request.job_id)
        if job.state in TERMINAL:
            raise Conflict(f"job {job.id} has already ended ({job.state}).")
        cancelled = self.events.transition(job.id, CANCELLED, error="cancelled by request", expect=(QUEUED,))
        if cancelled is not None:
            return self._message(cancelled)
        # It runs: the worker stops at the next step boundary and reports it cancelled.
        self.supervisor.control(job.id, "cancel")
        return self._message(self._job(job.id))

    @_answers
    def RetryJob(self, request, context):
        return self._message(self.intake.retry(self._job(request.job_id)))

    @_answers
    def SaveNow(self, request, context):
        return self._ask_running(request.job_id, "save")

    @_answers
    def SampleNow(self, request, context):
        return self._ask_running(request.job_id, "sample")

    def _ask_running(self, ref: str, what: str) -> pb.Job:
        job = self._job(ref)
        if job.state != RUNNING or not self.supervisor.control(job.id, what):
            raise Conflict(f"job {job.id} is {job.state}, not running; only a running job can {what} now.")
        return self._message(job)

    @_answers
    def StreamEvents(self, request, context):
        if request.since < 0:
            raise RequestError(f"since must be 0 or more, not {request.since}.")
        kinds = _kinds(request.kinds)
        job_id = self._job(request.job_id).id if request.job_id else None
        if not self._streams.acquire(blocking=False):
            raise Busy(f"{MAX_STREAMS} event streams are open already; close some and try again.")
        try:
            stopped = lambda: self.stopping or not context.is_active()  # noqa: E731
            for event in self.events.follow(job_id, request.since, follow=request.follow, stopped=stopped):
                if not kinds or event.kind in kinds:
                    yield event_message(event)
        finally:
            self._streams.release()
        if self.stopping:  # not the stream's end: a client reconnects and continues after its last event
            raise Unavailable("the daemon is stopping.")

    # ------------------------------------------------------------------ files

    @_answers
    def GetSample(self, request, context):
        _check_max_size(request.max_size)
        if request.path and (request.job_id or request.seq):
            raise RequestError("give either a sample's path or its job and event number, not both.")
        if request.path:
            path = self._path(request.path, [self.home.outputs, self.home.inbox], "sample")
        else:
            event = self.store.event(self._job(request.job_id).id, request.seq)
            if event is None or event.kind != "sample":
                raise NotFound(f"job {request.job_id} has no sample event number {request.seq}.")
            path = self._path(event.payload["path"], [self.home.outputs], "sample")
        return image_message(path, request.max_size)

    @_answers
    def ListArtifacts(self, request, context):
        job = self._job(request.job_id)
        out_dir = self.home.job_dir(job.id)
        kinds = {e.payload.get("path"): e.payload.get("kind", "other") for e in self.store.job_events(job.id, "artifact")}
        samples = {e.payload.get("path") for e in self.store.job_events(job.id, "sample")}
        artifacts = []
        for path in sorted(out_dir.rglob("*")) if out_dir.is_dir() else ():
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(out_dir).parts):
                continue
            st = path.stat()
            kind = kinds.get(str(path)) or ("sample" if str(path) in samples else "other")
            artifacts.append(pb.Artifact(path=str(path), kind=kind, bytes=st.st_size, job_id=job.id, mtime=st.st_mtime))
        return pb.ListArtifactsReply(artifacts=artifacts)

    @_answers
    def DownloadArtifact(self, request, context):
        path = self._path(request.path, [self.home.outputs], "artifact")
        total = path.stat().st_size
        with open(path, "rb") as f:
            offset = 0
            while data := f.read(CHUNK):
                yield pb.Chunk(data=data, offset=offset, total=total)
                offset += len(data)

    # ------------------------------------------------------------------ LoRA tools (in a worker)

    @_answers
    def BlockLayout(self, request, context):
        path, _ = self._artifact(request.path)
        layout = self._call("blocks", path=str(path))
        return pb.BlockLayoutReply(
            path=layout["path"],
            blocks=[pb.Block(**b) for b in layout["blocks"]],
            pass_through=layout["pass_through"],
            vector=layout["vector"],
            presets=[pb.Preset(name=n, vector=v) for n, v in layout["presets"].items()],
        )

    @_answers
    def Chop(self, request, context):
        path, job = self._artifact(request.path)
        vector_tokens(request.vector)
        return self._new_artifact(job, self._call("chop", path=str(path), vector=request.vector), "chopped")

    @_answers
    def Resize(self, request, context):
        path, job = self._artifact(request.path)
        recipe = request.recipe or (job.recipe or {}).get("resize_recipe", "")
        if not recipe:
            raise RequestError("give a resize recipe, for example fro_ckpt=1,thr=-3.55.")
        return self._new_artifact(job, self._call("resize", path=str(path), recipe=recipe, model=job.model), "resized")

    @_answers
    def Preview(self, request, context):
        path, job = self._artifact(request.path)
        if request.vector:
            vector_tokens(request.vector)
        _check_max_size(request.max_size)
        for line in request.prompts:
            _check_preview_prompt(line)
        seed = request.seed if request.HasField("seed") else (job.recipe or {}).get("seed", 0)
        images = self._call(
            "preview",
            lora=str(path),
            vector=request.vector or None,
            prompts=list(request.prompts) or None,
            seed=seed,
            model=job.model,
            out_dir=str(self.home.job_dir(job.id) / "previews"),
        )
        return pb.PreviewReply(images=[image_message(Path(p), request.max_size) for p in images])

    # ------------------------------------------------------------------ helpers

    def _message(self, job: Job) -> pb.Job:
        return job_message(job, self.home.job_dir(job.id))

    def _job(self, ref: str) -> Job:
        if not ref:
            raise RequestError("the request names no job; give its id or number.")
        job = self.store.get(ref.strip())
        if job is None:
            raise NotFound(f"there is no job {ref!r}; `loradrop jobs` lists them.")
        return job

    def _path(self, text: str, roots: list[Path], what: str) -> Path:
        path = resolve_inside(text, roots, what=what)
        if not path.is_file():
            raise NotFound(f"{what} {text!r} is not a file.")
        return path

    def _artifact(self, text: str) -> tuple[Path, Job]:
        """A LoRA file inside a job's folder of outputs/, and that job."""
        path = self._path(text, [self.home.outputs], "artifact")
        if path.suffix != ".safetensors":
            raise RequestError(f"{path.name} is not a .safetensors LoRA file.")
        job = self.store.get(path.relative_to(self.home.outputs).parts[0])
        if job is None:
            raise NotFound(f"{path} is not inside a job's output folder.")
        return path, job

    def _call(self, name: str, **args) -> Any:
        if self.stopping:
            raise Unavailable("the daemon is stopping.")
        return self.supervisor.call(name, args, TOOL_TIMEOUT[name])

    def _new_artifact(self, job: Job, path_text: str, kind: str) -> pb.Artifact:
        path = Path(path_text)
        st = path.stat()
        self.events.emit(job.id, "artifact", {"path": str(path), "kind": kind, "bytes": st.st_size, "step": None})
        return pb.Artifact(path=str(path), kind=kind, bytes=st.st_size, job_id=job.id, mtime=st.st_mtime)


# ---------------------------------------------------------------------------- messages


def job_message(job: Job, out_dir: Path) -> pb.Job:
    return pb.Job(
        id=job.id,
        number=job.number,
        name=job.name,
        state=pb.JobState.Value(job.state.upper()),
        source=job.source,
        dataset=job.dataset,
        model=job.model or "",
        block_vector=job.block_vector or "",
        recipe_toml=tomli_w.dumps(job.recipe) if job.recipe else "",
        created=job.created,
        started=job.started or 0.0,
        ended=job.ended or 0.0,
        error=job.error,
        attempts=job.attempts,
        progress=_progress(job.progress) if job.progress else None,
        out_dir=str(out_dir),
        final=job.result.get("final") or "",
        resized=job.result.get("resized") or "",
        chopped=job.result.get("chopped") or "",
        last_seq=job.last_seq,
    )


def _kinds(kinds) -> frozenset[str]:
    """The event kinds a stream asked for; a kind this daemon never emits just matches nothing."""
    if len(kinds) > 16 or not all(_KIND.fullmatch(k) for k in kinds):
        raise RequestError("kinds takes at most 16 event kinds, each a lower-case word such as log, progress or state.")
    return frozenset(kinds)


def event_message(event: Event) -> pb.Event:
    message = pb.Event(seq=event.seq, global_seq=event.gseq, job_id=event.job_id, time=event.time, kind=event.kind)
    p = event.payload
    kind = event.kind
    if kind == "log":
        message.log.CopyFrom(pb.LogLine(level=str(p.get("level", "info")), text=str(p.get("text", ""))))
    elif kind == "stage":
        message.stage.CopyFrom(pb.StageChange(stage=str(p.get("stage", ""))))
    elif kind == "progress":
        message.progress.CopyFrom(_progress(p))
    elif kind == "sample":
        message.sample.CopyFrom(pb.SampleReady(path=str(p.get("path", "")), step=int(p.get("step") or 0), prompt_index=int(p.get("prompt_index") or 0), prompt=str(p.get("prompt", ""))))
    elif kind == "artifact":
        step = p.get("step")
        message.artifact.CopyFrom(pb.ArtifactReady(path=str(p.get("path", "")), kind=str(p.get("kind", "")), bytes=int(p.get("bytes") or 0), step=None if step is None else int(step)))
    elif kind == "state":
        message.state.CopyFrom(pb.StateChange(state=pb.JobState.Value(str(p.get("state", "")).upper()), error=str(p.get("error", ""))))
    else:
        message.other_json = json.dumps(p)
    return message


def image_message(path: Path, max_size: int) -> pb.Image:
    from PIL import Image

    try:
        with Image.open(path) as image:
            original = image.size
            if original[0] * original[1] > Image.MAX_IMAGE_PIXELS:  # decoded here, in the server: refuse bombs first
                raise RequestError(f"{path} is {original[0]}x{original[1]}, too large to send as a sample.")
            image.load()
            if max_size and max(original) > max_size:
                image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            image.save(out, format="PNG")
            size = image.size
    except RequestError:
        raise
    # Pillow reports bad data with many exception types (SyntaxError, ValueError, its
    # DecompressionBombError...); all mean the same here.
    except Exception as e:
        raise RequestError(f"{path} is not a readable image ({str(e) or type(e).__name__}).") from None
    return pb.Image(path=str(path), png=out.getvalue(), width=size[0], height=size[1], original_width=original[0], original_height=original[1])


def _progress(p: dict[str, Any]) -> pb.Progress:
    optional = {k: float(p[k]) for k in ("loss", "avg_loss", "lr_unet", "lr_te", "rate", "eta_s") if p.get(k) is not None}
    return pb.Progress(stage=str(p.get("stage", "")), done=int(p.get("done") or 0), total=int(p.get("total") or 0), **optional)


def _check_max_size(max_size: int) -> None:
    if max_size < 0:
        raise RequestError(f"max_size must be 0 (full size) or more, not {max_size}.")


def _check_preview_prompt(line: str) -> None:
    """A preview renders in the training worker, between the steps of a running job: a picture
    far past SDXL's sizes would hold that worker (and the job) for hours, or exhaust its memory."""
    prompt = parse_prompt_line(line, lambda _warning: None)
    if prompt.width * prompt.height > MAX_PREVIEW_PIXELS:
        raise RequestError(f"a preview of {prompt.width}x{prompt.height} is too large; ask for at most {MAX_PREVIEW_PIXELS >> 20} megapixels (e.g. --w 2048 --h 2048).")


def _state_name(code: int) -> str:
    name = pb.JobState.Name(code).lower() if code in pb.JobState.values() else ""
    if name not in STATES:
        raise RequestError(f"job state {code} is not one of {', '.join(STATES)}.")
    return name


def _request(message: pb.SubmitJobRequest) -> Request:
    return Request(overrides=tuple(message.overrides), name=message.name, model=message.model, block_vector=message.block_vector)


def _chain(first, rest) -> Iterator:
    yield first
    yield from rest
