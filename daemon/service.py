"""The gRPC API's methods: check the request, ask the store, the intake or a worker, answer.

Every refusal is a status code with one sentence (see errors.py); nothing here imports torch:
work that needs it is a call into a worker process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from loradrop import __version__
from loradrop.engine.data.prompts import MAX_SAMPLE_STEPS, check_limits, parse_prompt_line
from loradrop.engine.events import Artifact, Log, PreviewProgress
from loradrop.engine.recipe import check_block_vector
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.proto.v1 import loradrop_pb2_grpc as rpc

from . import captions
from .answers import answers
from .config import DaemonConfig
from .errors import Conflict, NotFound, RequestError, Unavailable
from .events import EventLog
from .home import Home
from .intake import Intake, Request
from .limits import MAX_DOWNLOADS, MAX_STREAMS, MAX_TOOL_CALLS, MAX_UPLOADS, Gate, IdleWatch
from .messages import event_message, job_message
from .records import CANCELLED, REVIEW, RUNNING, STATES, TERMINAL, WAITING, ClusterView, Job
from .security import refuse_links_out, resolve_inside
from .supervisor import Supervisor
from .thumbnails import image_message
from .watcher import InboxWatcher

log = logging.getLogger(__name__)

CHUNK = 1 << 20
WORKER_CALL_S = {
    "blocks": 300.0,
    "chop": 300.0,
    "resize": 1800.0,
    "preview": 1800.0,
}  # how long each call into a worker may take
_KIND = re.compile(r"[a-z_]{1,32}")


class Service(rpc.LoradropServicer):
    def __init__(
        self,
        home: Home,
        config: DaemonConfig,
        events: EventLog,
        intake: Intake,
        supervisor: Supervisor,
        watcher: InboxWatcher,
    ):
        self.home, self.config, self.events, self.intake, self.supervisor, self.watcher = (
            home,
            config,
            events,
            intake,
            supervisor,
            watcher,
        )
        self.store = events.store
        self.started = time.time()
        self.stopping = False
        self._streams = Gate("event streams", MAX_STREAMS)
        self._uploads = Gate("uploads", MAX_UPLOADS, per_host=MAX_UPLOADS // 2)
        self._downloads = Gate("downloads", MAX_DOWNLOADS, per_host=MAX_DOWNLOADS // 2)
        self._tool_calls = Gate("LoRA tool calls (block layout, chop, resize, preview)", MAX_TOOL_CALLS)
        self._idle = IdleWatch(config.idle_seconds)

    # ------------------------------------------------------------------ daemon and jobs

    @answers
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
            captioner=self.config.captioner or "",
            cluster=_cluster(self.supervisor.cluster()),
        )

    @answers
    def SubmitJob(self, request, context):
        return self._message(self.intake.submit(request.dataset, _request(request)))

    @answers
    def UploadDataset(self, request_iterator, context):
        with self._uploads.enter(context), self._idle.watching(context) as watched:
            messages = watched.messages(request_iterator)
            first = next(messages, None)
            if first is None or not first.HasField("job"):
                raise RequestError(
                    "an upload must start with a message that carries the job (its folder name and settings)."
                )
            chunks = (m.data for m in _chain(first, messages))
            return self._message(self.intake.upload(_request(first.job), first.job.dataset, chunks))

    @answers
    def ListJobs(self, request, context):
        states = [_state_name(s) for s in request.states]
        return pb.ListJobsReply(jobs=[self._message(j) for j in self.store.jobs(states)])

    @answers
    def GetJob(self, request, context):
        return self._message(self._job(request.job_id))

    @answers
    def CancelJob(self, request, context):
        job = self._job(request.job_id)
        if job.state in TERMINAL:
            raise Conflict(f"job {job.id} has already ended ({job.state}).")
        cancelled = self.events.transition(job.id, CANCELLED, error="cancelled by request", expect=WAITING)
        if cancelled is not None:
            return self._message(cancelled)
        # It runs: the worker stops at the next step boundary and reports it cancelled.
        self.supervisor.control(job.id, "cancel")
        return self._message(self._job(job.id))

    @answers
    def RetryJob(self, request, context):
        return self._message(self.intake.retry(self._job(request.job_id)))

    @answers
    def AcceptCaptions(self, request, context):
        job = self._job(request.job_id)
        if job.state != REVIEW:
            raise Conflict(
                f"job {job.id} is {job.state}, not waiting for caption review; only a job in review can be accepted."
            )
        accepted = self.events.accept_captions(job.id)
        if accepted is None:
            raise Conflict(f"job {job.id} changed state meanwhile; look at it again.")
        self.events.emit(job.id, Log("captions accepted; the job is queued to train"))
        self.supervisor.wake()
        return self._message(accepted)

    @answers
    def ListCaptions(self, request, context):
        job = self._job(request.job_id)
        folder, extension = self._dataset(job)
        return pb.ListCaptionsReply(
            captions=[pb.Caption(**dataclasses.asdict(c)) for c in captions.listing(folder, extension)]
        )

    @answers
    def SetCaption(self, request, context):
        job = self._job(request.job_id)
        if job.state == RUNNING:
            raise Conflict(
                f"job {job.id} is running and reads its captions; edit them once it has ended, or while it waits for review."
            )
        folder, extension = self._dataset(job)
        return pb.Caption(
            **dataclasses.asdict(captions.write(folder, extension, request.image, request.text))
        )

    def _dataset(self, job: Job) -> tuple[Path, str]:
        """The job's dataset folder (only one inside the inbox, with no links out) and its caption extension."""
        folder = resolve_inside(job.dataset, [self.home.inbox], what="dataset")
        if not folder.is_dir():
            raise NotFound(f"the dataset folder {job.dataset} of job {job.id} is gone.")
        refuse_links_out(folder, self.home.inbox)
        return folder, (job.recipe or {}).get("caption_extension", ".txt")

    @answers
    def SaveNow(self, request, context):
        return self._ask_running(request.job_id, "save")

    @answers
    def SampleNow(self, request, context):
        return self._ask_running(request.job_id, "sample")

    def _ask_running(self, ref: str, what: str) -> pb.Job:
        job = self._job(ref)
        if job.state != RUNNING or not self.supervisor.control(job.id, what):
            raise Conflict(f"job {job.id} is {job.state}, not running; only a running job can {what} now.")
        return self._message(job)

    @answers
    def StreamEvents(self, request, context):
        if request.since < 0:
            raise RequestError(f"since must be 0 or more, not {request.since}.")
        kinds = _kinds(request.kinds)
        job_id = self._job(request.job_id).id if request.job_id else None
        with self._streams.enter(context):
            stopped = lambda: self.stopping or not context.is_active()  # noqa: E731
            for event in self.events.follow(job_id, request.since, follow=request.follow, stopped=stopped):
                if not kinds or event.kind in kinds:
                    yield event_message(event)
        if self.stopping:  # not the stream's end: a client reconnects and continues after its last event
            raise Unavailable("the daemon is stopping.")

    # ------------------------------------------------------------------ files

    @answers
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
            path = self._path(event.body.path, [self.home.outputs], "sample")
        return image_message(path, request.max_size)

    @answers
    def ListArtifacts(self, request, context):
        job = self._job(request.job_id)
        out_dir = self.home.job_dir(job.id)
        kinds = {e.body.path: e.body.kind for e in self.store.job_events(job.id, "artifact")}
        samples = {e.body.path for e in self.store.job_events(job.id, "sample")}
        artifacts = []
        for path in sorted(out_dir.rglob("*")) if out_dir.is_dir() else ():
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(out_dir).parts):
                continue
            st = path.stat()
            kind = kinds.get(str(path)) or (
                "sample" if str(path) in samples else "preview" if path.parent.name == "previews" else "other"
            )
            artifacts.append(
                pb.Artifact(path=str(path), kind=kind, bytes=st.st_size, job_id=job.id, mtime=st.st_mtime)
            )
        return pb.ListArtifactsReply(artifacts=artifacts)

    @answers
    def DownloadArtifact(self, request, context):
        path = self._path(request.path, [self.home.outputs], "artifact")
        total = path.stat().st_size
        with self._downloads.enter(context), self._idle.watching(context) as watched, open(path, "rb") as f:
            offset = 0
            while data := f.read(CHUNK):
                yield pb.Chunk(data=data, offset=offset, total=total)  # returns once the client took it
                watched.progressed()
                offset += len(data)

    # ------------------------------------------------------------------ LoRA tools (in a worker)

    @answers
    def BlockLayout(self, request, context):
        path, _ = self._artifact(request.path)
        layout = self._call("blocks", context, path=str(path))
        return pb.BlockLayoutReply(
            path=layout["path"],
            blocks=[pb.Block(**b) for b in layout["blocks"]],
            pass_through=layout["pass_through"],
            vector=layout["vector"],
            presets=[pb.Preset(name=n, vector=v) for n, v in layout["presets"].items()],
        )

    @answers
    def Chop(self, request, context):
        path, job = self._artifact(request.path)
        check_block_vector(
            request.vector, "the vector", entries=None
        )  # its length is checked against the file's blocks
        return self._new_artifact(
            job, self._call("chop", context, path=str(path), vector=request.vector), "chopped"
        )

    @answers
    def Resize(self, request, context):
        path, job = self._artifact(request.path)
        recipe = request.recipe or (job.recipe or {}).get("resize_recipe", "")
        if not recipe:
            raise RequestError("give a resize recipe, for example fro_ckpt=1,thr=-3.55.")
        return self._new_artifact(
            job, self._call("resize", context, path=str(path), recipe=recipe, model=job.model), "resized"
        )

    @answers
    def Preview(self, request, context):
        path, job = self._artifact(request.path)
        if request.vector:
            check_block_vector(request.vector, "the vector", entries=None)
        _check_max_size(request.max_size)
        if not 0 <= request.steps <= MAX_SAMPLE_STEPS:
            raise RequestError(
                f"a preview takes 1 to {MAX_SAMPLE_STEPS} steps (0: a quick look), not {request.steps}."
            )
        for line in request.prompts:
            check_limits(parse_prompt_line(line, lambda _warning: None), "the preview prompt")
        seed = request.seed if request.HasField("seed") else (job.recipe or {}).get("seed", 0)
        request_id = request.request_id[:64] or uuid.uuid4().hex[:12]

        def progress(step: PreviewProgress) -> None:
            self.events.emit(job.id, dataclasses.replace(step, request_id=request_id))

        images = self._call(
            "preview",
            context,
            progress=progress,
            lora=str(path),
            vector=request.vector or None,
            prompts=list(request.prompts) or None,
            seed=seed,
            model=job.model,
            out_dir=str(self.home.job_dir(job.id) / "previews"),
            steps=request.steps,
        )
        replies = []
        for p in images:
            image = Path(p)
            self.events.emit(job.id, Artifact.of(image, "preview"))
            replies.append(image_message(image, request.max_size))
        return pb.PreviewReply(images=replies)

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

    def _call(self, name: str, context, progress=None, **args) -> Any:
        if self.stopping:
            raise Unavailable("the daemon is stopping.")
        with self._tool_calls.enter(context):
            return self.supervisor.call(
                name, args, WORKER_CALL_S[name], progress=progress, cancelled=lambda: not context.is_active()
            )

    def _new_artifact(self, job: Job, path_text: str, kind: str) -> pb.Artifact:
        path = Path(path_text)
        st = path.stat()
        self.events.emit(job.id, Artifact(str(path), kind, st.st_size))
        return pb.Artifact(path=str(path), kind=kind, bytes=st.st_size, job_id=job.id, mtime=st.st_mtime)


def _kinds(kinds) -> frozenset[str]:
    """The event kinds a stream asked for; a kind this daemon never emits just matches nothing."""
    if len(kinds) > 16 or not all(_KIND.fullmatch(k) for k in kinds):
        raise RequestError(
            "kinds takes at most 16 event kinds, each a lower-case word such as log, progress or state."
        )
    return frozenset(kinds)


def _check_max_size(max_size: int) -> None:
    if max_size < 0:
        raise RequestError(f"max_size must be 0 (full size) or more, not {max_size}.")


def _state_name(code: int) -> str:
    name = pb.JobState.Name(code).lower() if code in pb.JobState.values() else ""
    if name not in STATES:
        raise RequestError(f"job state {code} is not one of {', '.join(STATES)}.")
    return name


def _request(message: pb.SubmitJobRequest) -> Request:
    return Request(
        overrides=tuple(message.overrides),
        name=message.name,
        model=message.model,
        block_vector=message.block_vector,
    )


def _cluster(view: ClusterView) -> pb.Cluster:
    nodes = [pb.Node(**dataclasses.asdict(n)) for n in view.nodes]
    return pb.Cluster(address=view.address, resource=view.resource, nodes=nodes)


def _chain(first, rest) -> Iterator:
    yield first
    yield from rest
