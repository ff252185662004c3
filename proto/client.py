"""A small typed client for the loradrop daemon, used by the CLI, the TUI and scripts.

    from loradrop.proto.client import Client

    with Client() as daemon:                     # the default home's socket
        job = daemon.upload("photos/", overrides=["max_train_steps=40"])
        for event in daemon.events(job.id):      # reconnects by itself, missing nothing
            print(event.kind, event.log.text if event.HasField("log") else "")

A target is `unix:PATH` (or a path), or `HOST:PORT` (TCP: pass `tls_ca=` for a daemon with TLS
and `token=`/`token_file=`). It imports no torch and no engine.
"""

from __future__ import annotations

import os
import tarfile
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import grpc

from loradrop.errors import UserError
from loradrop.fsutil import atomic_path
from loradrop.home_path import home_of_socket, start_command
from loradrop.proto.connect import default_target, target_from_args
from loradrop.proto.v1 import loradrop_pb2 as pb
from loradrop.proto.v1 import loradrop_pb2_grpc as rpc

MAX_MESSAGE = 64 << 20
CHUNK = 1 << 20
TIMEOUT = 30.0  # seconds for a plain call
LONG_CALL_S = 1800.0  # a client's deadline for chop, resize, block layout, preview, downloads: they may wait for a worker
STATES = {name.lower(): code for name, code in pb.JobState.items() if code}  # "queued" -> pb.QUEUED, ...
TERMINAL = frozenset({pb.DONE, pb.FAILED, pb.CANCELLED})  # a job in one of these has ended


class ClientError(UserError):
    """A call the daemon refused or could not answer; `code` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


def state_name(state: int) -> str:
    return pb.JobState.Name(state).lower() if state in STATES.values() else "unknown"


def _read_client_file(path: str | os.PathLike, option: str, want: str) -> bytes:
    """A file a client option names, or one sentence that says which option and what it needs."""
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ClientError(f"cannot read {option} {path} ({e.strerror or e}); give {want}.") from None


class Client:
    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
        tls_ca: str | os.PathLike | None = None,
    ):
        self.target = _grpc_target(target or default_target())
        if token_file:
            token = (
                _read_client_file(token_file, "--token-file", "a file with the daemon's token")
                .decode(errors="replace")
                .strip()
            )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_client_file(
                    tls_ca, "--tls-ca", "the PEM certificate the daemon's --tls-cert was signed with"
                )
            )
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(self.target, options=options)
        self._stub = rpc.LoradropStub(self._channel)

    # ------------------------------------------------------------------ command-line plumbing

    @classmethod
    def from_args(cls, args) -> "Client":
        """A client for the options `loradrop.proto.connect.add_arguments` declared."""
        return cls(target_from_args(args), token_file=args.token_file, tls_ca=args.tls_ca)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ calls

    def status(self) -> pb.StatusReply:
        return self._call(self._stub.Status, pb.StatusRequest())

    def submit(
        self,
        dataset: str | os.PathLike,
        *,
        overrides: Iterable[str] = (),
        name: str = "",
        model: str = "",
        block_vector: str = "",
    ) -> pb.Job:
        """Queue a folder that already lies inside the daemon's inbox."""
        request = pb.SubmitJobRequest(
            dataset=str(dataset), overrides=list(overrides), name=name, model=model, block_vector=block_vector
        )
        return self._call(self._stub.SubmitJob, request)

    def upload(
        self,
        folder: str | os.PathLike,
        *,
        overrides: Iterable[str] = (),
        name: str = "",
        model: str = "",
        block_vector: str = "",
    ) -> pb.Job:
        """Send a local folder (files only; symlinks are sent as the files they point to) and queue it."""
        folder = Path(folder).expanduser().resolve()
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder; give a folder of captioned images.")
        job = pb.SubmitJobRequest(
            dataset=folder.name, overrides=list(overrides), name=name, model=model, block_vector=block_vector
        )
        messages = (
            pb.UploadChunk(job=job if i == 0 else None, data=data)
            for i, data in enumerate(_tar_chunks(folder))
        )
        return self._call(self._stub.UploadDataset, messages, timeout=None)

    def jobs(self, states: Iterable[str] = ()) -> list[pb.Job]:
        return list(
            self._call(self._stub.ListJobs, pb.ListJobsRequest(states=[STATES[s] for s in states])).jobs
        )

    def job(self, job_id: str) -> pb.Job:
        return self._call(self._stub.GetJob, pb.JobRef(job_id=str(job_id)))

    def wait_job(
        self, job_id: str, timeout: float, *, states: frozenset[int] = TERMINAL, interval: float = 0.2
    ) -> pb.Job:
        """The job once it is in one of `states` (by default: once it has ended); ClientError when
        it is not after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.state in states:
                return job
            if time.monotonic() >= deadline:
                raise ClientError(f"job {job_id} is still {state_name(job.state)} after {timeout:g} s.")
            time.sleep(interval)

    def cancel(self, job_id: str) -> pb.Job:
        return self._call(self._stub.CancelJob, pb.JobRef(job_id=str(job_id)))

    def retry(self, job_id: str) -> pb.Job:
        return self._call(self._stub.RetryJob, pb.JobRef(job_id=str(job_id)))

    def accept_captions(self, job_id: str) -> pb.Job:
        """Let a job waiting for caption review go on to train."""
        return self._call(self._stub.AcceptCaptions, pb.JobRef(job_id=str(job_id)))

    def captions(self, job_id: str) -> list[pb.Caption]:
        """The images of the job's dataset with their captions."""
        return list(self._call(self._stub.ListCaptions, pb.JobRef(job_id=str(job_id))).captions)

    def set_caption(self, job_id: str, image: str, text: str) -> pb.Caption:
        return self._call(
            self._stub.SetCaption, pb.SetCaptionRequest(job_id=str(job_id), image=image, text=text)
        )

    def save_now(self, job_id: str) -> pb.Job:
        return self._call(self._stub.SaveNow, pb.JobRef(job_id=str(job_id)))

    def sample_now(self, job_id: str) -> pb.Job:
        return self._call(self._stub.SampleNow, pb.JobRef(job_id=str(job_id)))

    def events(
        self,
        job_id: str = "",
        since: int = 0,
        *,
        follow: bool = True,
        reconnect: bool = True,
        kinds: Iterable[str] = (),
    ) -> Iterator[pb.Event]:
        """Events after `since` (the job's numbers, or the global ones without a job), only those
        of `kinds` when given. When the daemon goes away, waits for it and continues after the
        last event seen: none missed, none twice. With a job and `follow`, ends once the job has ended."""
        delay = 0.2
        while True:
            try:
                request = pb.StreamEventsRequest(
                    job_id=str(job_id), since=since, follow=follow, kinds=list(kinds)
                )
                for event in self._stub.StreamEvents(
                    request, metadata=self._metadata, wait_for_ready=reconnect
                ):
                    since = event.seq if job_id else event.global_seq
                    delay = 0.2
                    yield event
                return
            except grpc.RpcError as e:
                if not reconnect or e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise self._error(e) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def sample(self, path: str = "", *, job_id: str = "", seq: int = 0, max_size: int = 0) -> pb.Image:
        """A sample (by path, or by its job and event number) as PNG, fit into `max_size` pixels."""
        return self._call(
            self._stub.GetSample,
            pb.GetSampleRequest(path=str(path), job_id=str(job_id), seq=seq, max_size=max_size),
        )

    def artifacts(self, job_id: str) -> list[pb.Artifact]:
        return list(self._call(self._stub.ListArtifacts, pb.JobRef(job_id=str(job_id))).artifacts)

    def download(self, path: str, dest: str | os.PathLike) -> Path:
        """Copy an artifact to `dest` (a file, or a folder to put it in); written atomically."""
        dest = Path(dest).expanduser()
        if dest.is_dir():
            dest = dest / Path(path).name
        try:
            with atomic_path(dest) as tmp, open(tmp, "wb") as f:
                for chunk in self._stub.DownloadArtifact(
                    pb.ArtifactRef(path=str(path)), metadata=self._metadata, timeout=LONG_CALL_S
                ):
                    f.write(chunk.data)
        except grpc.RpcError as e:
            raise self._error(e) from None
        return dest

    def block_layout(self, path: str) -> pb.BlockLayoutReply:
        return self._call(self._stub.BlockLayout, pb.ArtifactRef(path=str(path)), timeout=LONG_CALL_S)

    def chop(self, path: str, vector: str) -> pb.Artifact:
        return self._call(self._stub.Chop, pb.ChopRequest(path=str(path), vector=vector), timeout=LONG_CALL_S)

    def resize(self, path: str, recipe: str = "") -> pb.Artifact:
        return self._call(
            self._stub.Resize, pb.ResizeRequest(path=str(path), recipe=recipe), timeout=LONG_CALL_S
        )

    def preview(
        self,
        path: str,
        *,
        vector: str = "",
        prompts: Iterable[str] = (),
        seed: int | None = None,
        max_size: int = 0,
        steps: int = 0,
        request_id: str = "",
        cancel: threading.Event | None = None,
    ) -> list[pb.Image]:
        """Render with the LoRA (`steps` 0: a quick look). Its progress comes as "preview" events
        on the LoRA's job, named by `request_id`; setting `cancel` (from another thread) cancels
        the call, and the daemon stops rendering."""
        request = pb.PreviewRequest(
            path=str(path),
            vector=vector,
            prompts=list(prompts),
            seed=seed,
            max_size=max_size,
            steps=steps,
            request_id=request_id,
        )
        if cancel is None:
            return list(self._call(self._stub.Preview, request, timeout=LONG_CALL_S).images)
        future = self._stub.Preview.future(request, metadata=self._metadata, timeout=LONG_CALL_S)
        while True:
            try:
                return list(future.result(timeout=0.2).images)
            except grpc.FutureTimeoutError:
                if cancel.is_set():
                    future.cancel()
                    raise ClientError("the preview was cancelled.", grpc.StatusCode.CANCELLED) from None
            except grpc.FutureCancelledError:
                raise ClientError("the preview was cancelled.", grpc.StatusCode.CANCELLED) from None
            except grpc.RpcError as e:
                raise self._error(e) from None

    # ------------------------------------------------------------------ plumbing

    def _call(self, method, request, timeout: float | None = TIMEOUT):
        try:
            return method(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _error(self, e: grpc.RpcError) -> ClientError:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return ClientError(unreachable(self.target, e.details() or ""), code)
        return ClientError(e.details() or str(code), code)


def unreachable(target: str, details: str) -> str:
    """One sentence: which socket (or address) did not answer, why, and what to do about it."""
    if not target.startswith("unix:"):
        return f"cannot reach the daemon at {target} ({details}); is it running, and does --connect name it?"
    path = Path(target.removeprefix("unix:"))
    if not path.exists():
        why = "no such socket"
    elif "stopping" in details:
        why = "it is stopping"
    else:
        why = "nothing listens on the socket"
    home = home_of_socket(path)
    if home is None:  # a socket of another name: forwarded from another machine, most likely
        return f"cannot reach the daemon at {path} ({why}); is the daemon, or the ssh tunnel to it, running?"
    return f"cannot reach the daemon at {path} ({why}); start one with `{start_command(home)}`, or name another with --home or --connect."


def _grpc_target(target: str) -> str:
    if target.startswith("unix:"):
        return target
    if "/" in target or target.endswith(".sock"):
        return f"unix:{Path(target).expanduser().absolute()}"
    return target


def _tar_chunks(folder: Path) -> Iterator[bytes]:
    """The folder as an uncompressed tar stream, produced file by file (memory stays small)."""
    buffer = _Collect()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT, dereference=True) as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():  # follows symlinks: the daemon receives the files themselves
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
                yield from buffer.take()
    yield from buffer.take()


class _Collect:
    def __init__(self):
        self._data = bytearray()

    def write(self, data: bytes) -> int:
        self._data += data
        return len(data)

    def take(self) -> Iterator[bytes]:
        data, self._data = bytes(self._data), bytearray()
        for i in range(0, len(data), CHUNK):
            yield data[i : i + CHUNK]
