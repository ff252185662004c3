"""The daemon's side of a Ray cluster: the connection, and a worker handle that the worker slots
(daemon/worker_slot.py) use as they use a local process.

`RayCluster` connects the daemon to the cluster as a Ray driver, and counts the GPUs (or the
resource standing in for them) that jobs can run on. Each `RayWorker` is one actor holding one
GPU (daemon/ray_worker.py). A thread here reads the actor's stream into a local pipe, so the slot
reads, waits and notices death exactly as for a process; a lost actor (its node died, or was
removed) ends the stream with Ray's error, which becomes the reason the job's log gives.

When the node sees the daemon's home (the same files at the same path: a shared filesystem, or
this machine), the worker works in it. Otherwise (or with --ray-transfer always) the worker works
in a copy on its node: before a job, its dataset, its checkpoints and its base model are sent
there in chunks (a file the copy already holds, by size and mtime, is not sent again), and the
job's files come back as they are completed; the paths in the messages are swapped both ways.
Ray actors owned by the daemon die with it, as local workers do.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import secrets
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loradrop.errors import UserError
from loradrop.fsutil import atomic_write_text, is_partial

from .config import DaemonConfig
from .errors import Refused
from .file_mirror import FileChunk, Receiver, Stamp, chunks, files_under
from .home import Home
from .pipe import FAILED, Call, Done, Run, Stop, map_strings
from .records import ClusterNode, ClusterView
from .security import refuse_links_out

log = logging.getLogger(__name__)

KILL_WAIT = 10.0  # seconds a killed actor's stream has to end before the daemon stops waiting for it
IN_FLIGHT = 4  # chunks sent before waiting for the first: keeps the network busy, memory bounded
PROBE = ".ray-probe"  # a file in the home whose content tells a node it sees the same home


class RayCluster:
    """The daemon as a driver of a Ray cluster."""

    def __init__(self, config: DaemonConfig, home: Home):
        try:
            import ray
        except ImportError:
            raise UserError(
                "--ray needs Ray installed beside loradrop: pip install 'loradrop[ray]'."
            ) from None
        self.ray, self.home, self.resource = ray, home, config.ray_resource
        self.transfer = config.ray_transfer
        # Ray puts its own handlers on these (a stack trace, then exit 15); the daemon's stop them clean.
        ours = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            ray.init(
                address=config.ray,
                namespace="loradrop",
                log_to_driver=False,  # the workers' events carry their logs; Ray's own stay on the nodes
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(
                f"cannot join the Ray cluster at {config.ray!r} ({str(e).splitlines()[0]}); "
                "start one with `ray start --head` on this machine, or give --ray the head's address."
            ) from None
        if threading.current_thread() is threading.main_thread():
            for sig, handler in ours.items():
                if handler is not None:
                    signal.signal(sig, handler)
        self.address = ray.get_runtime_context().gcs_address
        self.token = secrets.token_hex(16)
        atomic_write_text(home.root / PROBE, self.token)

    def capacity(self) -> int:
        """How many workers the cluster has room for: its total of the GPU resource."""
        return int(self.ray.cluster_resources().get(self.resource, 0))

    def view(self, busy: dict[str, int]) -> ClusterView:
        """The cluster's nodes; `busy`: how many of the daemon's workers run a job on each node."""
        nodes = []
        for node in self.ray.nodes():
            short = node["NodeID"][:8]
            resources = node.get("Resources", {}) if node["Alive"] else {}
            gpus = float(resources.get(self.resource, 0))
            labels = sorted(name for name in resources if _is_label(name, self.resource))
            nodes.append(
                ClusterNode(
                    short,
                    node["NodeManagerAddress"],
                    bool(node["Alive"]),
                    gpus,
                    max(0.0, gpus - busy.get(short, 0)),
                    tuple(labels),
                )
            )
        return ClusterView(
            self.address, self.resource, tuple(sorted(nodes, key=lambda n: (not n.alive, n.id)))
        )

    def offers(self, node_id: str) -> frozenset[str]:
        """The resources a node offers: the names a job's `pin` may give."""
        for node in self.ray.nodes():
            if node["NodeID"] == node_id:
                return frozenset(node.get("Resources", {}))
        return frozenset()

    def launch(self, role: str, device: str, name: str) -> "RayWorker":
        return RayWorker(self, role, name)

    def shutdown(self) -> None:
        self.ray.shutdown()


def _is_label(name: str, resource: str) -> bool:
    """A resource a person gave a node (or Ray's accelerator type), not one every node has."""
    return (
        name != resource
        and name not in ("CPU", "GPU", "memory", "object_store_memory")
        and not (name.startswith("node:") or name.startswith("bundle_group"))
    )


@dataclass
class PathMap:
    """Daemon paths ↔ the node's copy: the home, and a base model kept outside it."""

    pairs: dict[str, str] = field(default_factory=dict)  # daemon folder -> the copy's

    def there(self, record):
        return map_strings(record, lambda text: _swap(text, self.pairs.items()))

    def back(self, record):
        return map_strings(record, lambda text: _swap(text, ((b, a) for a, b in self.pairs.items())))

    def copy_of(self, path: Path) -> str:
        return _swap(str(path), self.pairs.items())


def _swap(text: str, pairs) -> str:
    """Each folder of `pairs` (ours → theirs) replaced in `text` in one pass, the longest first: a
    copy's folder inside another's (the model's place in the copy) must not match as the outer."""
    pairs = dict(pairs)
    if not any(ours in text for ours in pairs):
        return text
    # A folder, not a name's prefix: followed by a separator, a quote, a bracket or the end.
    folders = "|".join(re.escape(ours) for ours in sorted(pairs, key=len, reverse=True))
    return re.sub(f"({folders})(?=[/\\s'\"),:;]|$)", lambda m: pairs[m.group(1)], text)


class RayWorker:
    """One actor holding one GPU, as a worker slot sees a process (daemon/worker_slot.Launched)."""

    def __init__(self, cluster: RayCluster, role: str, name: str):
        from .ray_worker import WorkerActor

        ray = cluster.ray
        self._cluster, self._ray = cluster, ray
        self.pid, self.where, self.device = 0, "", ""
        self._offers: frozenset[str] = frozenset()
        self._ended: str | None = None
        self.sentinel, self._sentinel_w = os.pipe()
        ours, self._theirs = multiprocessing.Pipe()
        self._theirs_lock = threading.Lock()  # the bridge and a refused Run both write to the pipe
        self.conn = _Conn(self, ours)
        self._paths: PathMap | None = None  # None: the node works in the daemon's home itself
        self._copy = ""
        self._ready = threading.Event()
        need = {"num_gpus": 1} if cluster.resource == "GPU" else {"resources": {cluster.resource: 1}}
        self._actor = (
            ray.remote(WorkerActor)
            .options(name=None, max_restarts=0, max_concurrency=8, num_cpus=1, **need)
            .remote(role)
        )
        threading.Thread(target=self._bridge, name=f"{name}-ray", daemon=True).start()

    # ------------------------------------------------------------------ as a slot sees a process

    def is_alive(self) -> bool:
        return self._ended is None

    def kill(self) -> None:
        try:
            self._ray.kill(self._actor, no_restart=True)
        except Exception as e:  # the cluster's head is gone too: the actor is as good as dead
            log.warning("cannot kill a Ray worker: %s", e)
        # Ray's answer to the stream can be lost with the node; the slot must still see the end.
        threading.Timer(KILL_WAIT, self._finish, ("did not end after it was killed",)).start()

    def ended(self) -> str:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1
        return self._ended or "ended"

    def offers(self, pin: str) -> bool:
        return pin in self._offers

    # ------------------------------------------------------------------ the bridge thread

    def _bridge(self) -> None:
        ray, home = self._ray, self._cluster.home
        receiver = Receiver(home.root)
        try:
            hello = ray.get(self._actor.hello.remote(str(home.root / PROBE), self._cluster.token))
            self.pid, self.where, self.device = hello.pid, hello.node_id[:8], hello.device
            self._offers = self._cluster.offers(hello.node_id)
            copy = not hello.sees_home or self._cluster.transfer == "always"
            if copy:
                self._copy = hello.scratch
                self._paths = PathMap({str(home.root): hello.scratch})
            outputs = self._paths.copy_of(home.outputs) if copy else None
            ray.get(self._actor.start.remote(hello.device, outputs))
            self._ready.set()
            for ref in self._actor.stream.remote():
                message = ray.get(ref)
                if isinstance(message, FileChunk):  # a finished file's chunk: written into the home
                    if message.path.startswith("outputs/"):  # a node writes nowhere else
                        receiver.take(message)
                    else:
                        log.error(
                            "a Ray worker on node %s sent a file for %s; refused", self.where, message.path
                        )
                else:
                    self._tell_slot(self._paths.back(message) if self._paths else message)
            self._finish("stopped")
        except ray.exceptions.RayActorError as e:
            self._finish(f"was lost with its Ray node {self.where or '(not yet placed)'} ({_first_line(e)})")
        except Exception as e:  # anything else in this thread must still end the worker, said plainly
            if self._ended is None:
                log.exception("the bridge to a Ray worker failed")
                self.kill()
            self._finish(f"lost its connection to the daemon ({_first_line(e)})")
        finally:
            receiver.close()

    def _finish(self, reason: str) -> None:
        """The worker is gone: the slot reads the end of its pipe and sees the sentinel (once)."""
        with self._theirs_lock:
            if self._ended is not None:
                return
            self._ended = reason
            self._theirs.close()
            os.close(self._sentinel_w)

    def _tell_slot(self, message: Any) -> None:
        with self._theirs_lock:
            if self._ended is None:
                self._theirs.send(message)

    # ------------------------------------------------------------------ messages to the actor

    def deliver(self, message: Any) -> None:
        if not self._ready.is_set():
            if isinstance(message, Stop):
                self.kill()  # never placed, or still loading: nothing to save
                return
            raise BrokenPipeError("the Ray worker is not placed yet")
        try:
            if self._paths is not None:
                try:
                    self._send_inputs(message)
                except Refused as e:  # as the worker would have refused it
                    self._tell_slot(Done(message.spec.job_id, FAILED, str(e)))
                    return
                message = self._paths.there(message)
            self._ray.get(self._actor.deliver.remote(message))  # waited for: a threaded actor keeps no order
        except self._ray.exceptions.RayError as e:
            # The actor is lost, or failed to take the files: either way it ends here, and the
            # slot resumes its job elsewhere as for any lost worker.
            self._finish(f"could not be sent its job's files ({_first_line(e)})")
            self.kill()
            raise BrokenPipeError(f"the Ray worker is gone ({_first_line(e)})") from None

    def _send_inputs(self, message: Any) -> None:
        """The files a message needs, sent to the node's copy: a job's dataset, checkpoints and
        base model; a preview's LoRA and model."""
        files: list[Path] = []
        if isinstance(message, Run):
            spec = message.spec
            refuse_links_out(spec.dataset, Path(message.inbox))  # the copy is made of what links lead to
            for folder in (spec.dataset, spec.out_dir):
                files += [folder / name for name in files_under(folder, folder)]
            if spec.model:
                files.append(self._model_file(Path(spec.model)))
        elif isinstance(message, Call):
            for value in message.args.values():
                if isinstance(value, str) and value.startswith("/") and Path(value).is_file():
                    files.append(self._model_file(Path(value)))
        self.push(files)

    def _model_file(self, path: Path) -> Path:
        """A file the job reads that may lie outside the home (the daemon's --model): its folder
        gets a place in the copy of its own."""
        folder = str(path.parent)
        if self._paths.copy_of(path) == str(path):
            digest = hashlib.sha256(folder.encode()).hexdigest()[:16]
            self._paths.pairs[folder] = f"{self._copy}/outside/{digest}"
        return path

    def push(self, files: list[Path]) -> int:
        """Send `files` to the node's copy, skipping those it holds already; the bytes sent."""
        ray = self._ray
        wanted = {self._rel(path): path for path in files if not is_partial(path.name)}
        held = ray.get(self._actor.have.remote(list(wanted)))
        sent, flying = 0, []
        for rel, path in wanted.items():
            if held.get(rel) == Stamp.of(path):
                continue
            for chunk in chunks(path, rel):
                flying.append(self._actor.put.remote(chunk))
                sent += len(chunk.data)
                if len(flying) >= IN_FLIGHT:
                    ray.get(flying.pop(0))
        ray.get(flying)
        return sent

    def _rel(self, path: Path) -> str:
        return Path(self._paths.copy_of(path)).relative_to(self._copy).as_posix()


class _Conn:
    """The slot's end of the pipe: what it sends goes to the actor; what it reads, the bridge wrote."""

    def __init__(self, worker: RayWorker, ours):
        self._worker, self._ours = worker, ours

    def send(self, message: Any) -> None:
        self._worker.deliver(message)

    def poll(self, timeout: float = 0.0) -> bool:
        return self._ours.poll(timeout)

    def recv(self) -> Any:
        return self._ours.recv()

    def fileno(self) -> int:
        return self._ours.fileno()

    def close(self) -> None:
        self._ours.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
