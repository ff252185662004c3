"""The worker as a Ray actor, on whichever node of the cluster Ray placed it.

The actor hosts the same `Worker` as a local process runs (daemon/worker.py), on a thread, and
talks to it over an in-process pipe; the daemon reaches it through three methods: `deliver` (a
message to the worker), `put` (a chunk of a file for it) and `stream` (everything the worker says,
in order, as a Ray streaming generator). When the node cannot see the daemon's home, the actor
works in a scratch copy of it, and `stream` sends each file the job completes under the copy's
outputs ahead of the message that follows it: the daemon has a checkpoint, sample or LoRA before
it hears of it. The paths in the messages are the daemon's to translate (daemon/ray_slot.py).

Needs loradrop (with its `train` extra) and ray installed on every node, at the daemon's version.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import ray

from loradrop.fsutil import process_running

from .file_mirror import FileChunk, Receiver, Stamp, Watcher, chunks, inside, relative
from .pipe import Done, Run

POLL_S = 1.0  # how often `stream` looks for finished files while the worker says nothing
BACKLOG = 8  # messages `stream` may run ahead of the daemon (chunks are 4 MiB: bounded memory)


@dataclass(frozen=True)
class Hello:
    node_id: str
    address: str
    pid: int
    device: str  # what the worker trains on: "cuda:0" when Ray gave the actor a GPU, else "cpu"
    sees_home: bool  # the daemon's home is visible here (the same files: a shared filesystem)
    scratch: str  # the node's copy of the home, for when it is not


class WorkerActor:
    def __init__(self, role: str):
        self.role = role
        base = _scratch_base()
        _sweep_copies(base)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"loradrop-{os.getpid()}-", dir=base))
        self._ours, self._theirs = multiprocessing.Pipe()
        self._receiver = Receiver(self.scratch)
        self._outputs: Watcher | None = None  # the copy's outputs, watched when the copy is used
        self._jobs: dict[str, list[Path]] = {}  # a job's folders in the copy, removed when it ends
        self._thread: threading.Thread | None = None

    def hello(self, probe: str, token: str) -> Hello:
        try:
            sees = Path(probe).read_text() == token
        except OSError:
            sees = False
        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        return Hello(
            ray.get_runtime_context().get_node_id(),
            ray.util.get_node_ip_address() or socket.gethostname(),
            os.getpid(),
            "cuda:0" if gpus else "cpu",  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave
            sees,
            str(self.scratch),
        )

    def start(self, device: str, outputs: str | None) -> None:
        """Start the worker; `outputs`: the copy's outputs folder to send back, None when the
        node sees the home."""
        from .worker import Worker

        if outputs is not None:
            self._outputs = Watcher(self.scratch, Path(outputs))
        self._thread = threading.Thread(
            target=Worker(self._theirs, self.role, device).serve, name="worker", daemon=True
        )
        self._thread.start()

    def deliver(self, message) -> None:
        if isinstance(message, Run) and self._outputs is not None:
            spec = message.spec
            self._jobs[spec.job_id] = [spec.out_dir, spec.dataset]
        self._ours.send(message)

    def have(self, paths: list[str]) -> dict[str, Stamp]:
        """The stamps of those of `paths` (relative to the copy) that the copy holds."""
        held = {}
        for rel in paths:
            path = inside(self.scratch, rel)
            if path.is_file():
                held[rel] = Stamp.of(path)
        return held

    def put(self, chunk: FileChunk) -> None:
        done = self._receiver.take(chunk)
        if done is not None and self._outputs is not None:
            self._outputs.know(chunk.path, chunk.stamp)  # the daemon has it: not sent back

    @ray.method(_generator_backpressure_num_objects=BACKLOG)
    def stream(self):
        while True:
            try:
                ready = self._ours.poll(POLL_S)
                message = self._ours.recv() if ready else None
            except (EOFError, OSError):
                message, ready = None, False
            yield from self._finished_files()
            if message is not None:
                if isinstance(message, Done):
                    # Before the daemon hears of it: it may hand this actor a job on the same
                    # dataset as soon as it does, and send the files again, which must not go.
                    self._forget(message.job_id)
                yield message
            elif not self._thread.is_alive() and not ready:
                # The worker stopped (asked to) and said all it had, and every file it finished
                # went back: the copy (with its latent cache) goes before the daemon hears the end.
                shutil.rmtree(self.scratch, ignore_errors=True)
                return

    def _finished_files(self):
        if self._outputs is None:
            return
        for rel in self._outputs.changed():
            try:
                yield from chunks(inside(self.scratch, rel), rel)
            except FileNotFoundError:
                pass  # replaced since it was listed: the next look sends the new one

    def _forget(self, job_id: str) -> None:
        """A job ended: its files are in the daemon's home; the copy's are removed."""
        for folder in self._jobs.pop(job_id, []):
            shutil.rmtree(folder, ignore_errors=True)
            self._outputs.forget(f"{relative(self.scratch, folder)}/")


def _sweep_copies(base: str) -> None:
    """Remove the copies that actors on this node left when they died with a job (a node killed,
    a daemon killed): their jobs resume elsewhere, from the daemon's home."""
    for entry in Path(base).glob("loradrop-*-*"):
        pid = entry.name.split("-")[1]
        if pid.isdigit() and not process_running(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _scratch_base() -> str:
    """Where a node keeps its copies: $LORADROP_RAY_SCRATCH, else the system's temporary folder."""
    base = os.environ.get("LORADROP_RAY_SCRATCH") or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    return base
