"""Worker processes: one per visible GPU (one on a CPU machine) for jobs, one more for LoRA tools.
With --ray, the training workers are Ray actors instead, one per GPU of the cluster, their number
following the cluster as nodes join and leave (daemon/ray_slot.py); the tool worker stays here.

Each worker is a slot (daemon/worker_slot.py): a process and the thread here that owns its pipe.
What becomes of a job when its worker reports or dies is the job policy's (daemon/job_policy.py):
a death fails the job with the reason or queues it again to resume from its last checkpoint (up
to --max-retries); a new worker is started and the queue goes on.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

from loradrop.engine.events import PreviewProgress

from . import worker
from .config import DaemonConfig
from .errors import Unavailable
from .events import EventLog
from .home import Home
from .job_policy import JobPolicy
from .records import ClusterView
from .worker_slot import WorkerSlot

log = logging.getLogger(__name__)

STOP_GRACE = 30.0  # seconds a stopping worker has to reach a step (or denoising) boundary
SCALE_EVERY = 2.0  # seconds between looks at the cluster's size (with --ray)


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


class Supervisor:
    def __init__(self, home: Home, config: DaemonConfig, events: EventLog):
        self.home, self.config, self.events = home, config, events
        self.policy = JobPolicy(home, config, events, wake=self.wake)
        self.ray = None
        self._scaling = threading.Lock()  # one change to the Ray workers at a time
        if config.ray:
            from .ray_slot import RayCluster

            self.ray = RayCluster(config, home)
            self.trainers: list[WorkerSlot] = []  # made by _scale, as the cluster has room
            self._made = 1  # worker 0 is the tool worker
        else:
            devices = visible_devices()
            count = len(devices) if config.workers is None else config.workers
            devices = (devices * count)[:count]  # --workers beyond the GPUs share them round-robin
            self.trainers = [
                WorkerSlot(self.policy, i, device, worker.TRAIN) for i, device in enumerate(devices)
            ]
        tool_index = 0 if self.ray else len(self.trainers)
        self.tools = WorkerSlot(self.policy, tool_index, "cpu", worker.TOOL)  # started on its first call

    @property
    def stopping(self) -> bool:
        return self.policy.stopping

    def start(self) -> None:
        self.policy.reconcile()
        if self.ray is not None:
            self._scale()
            threading.Thread(target=self._keep_scaled, name="ray-scale", daemon=True).start()
        for slot in self.trainers:
            slot.start()

    def _keep_scaled(self) -> None:
        said = ""  # the last problem logged: said once, not every SCALE_EVERY seconds
        while not self.policy.stopped.wait(SCALE_EVERY):
            try:
                self._scale()
            except Exception as e:  # the cluster's head unreachable a moment: the workers go on
                if str(e) != said:
                    log.warning("cannot read the Ray cluster's size: %s", e)
                said = str(e)
            else:
                if said:
                    log.warning("the Ray cluster answers again")
                said = ""

    def _scale(self) -> None:
        """As many workers as the cluster has GPUs (at most --workers): new ones for nodes that
        joined; idle ones retired when nodes left (a running job is never taken away)."""
        room = self.ray.capacity()  # asked outside the lock: a stop never waits on the cluster
        with self._scaling:  # the stop takes its list of workers to stop under it too
            if not self.stopping:
                self._scale_to(room)

    def _scale_to(self, room: int) -> None:
        if self.config.workers is not None:
            room = min(room, self.config.workers)
        live = [slot for slot in self.trainers if not slot.retired]
        for _ in range(room - len(live)):
            slot = WorkerSlot(
                self.policy, self._made, self.config.ray_resource, worker.TRAIN, self.ray.launch
            )
            self._made += 1
            live.append(slot)
            slot.start()
        spare = sorted((s for s in live if s.job_id is None), key=lambda s: s.state != "starting")
        for slot in spare[: max(0, len(live) - room)]:
            slot.retire()
        self.trainers = [s for s in self.trainers if not s.ended] + [
            s for s in live if s not in self.trainers
        ]

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Ask every worker to stop at its next step boundary (the job is queued again and
        resumes on the next start); kill those that have not stopped after `grace` seconds, or
        at once on `hurry`."""
        with self._scaling:
            self.policy.stopping = True
            self.policy.stopped.set()
            slots = [*self.trainers, self.tools]
        for slot in slots:
            slot.ask_stop()
        deadline = time.monotonic() + grace
        for slot in slots:
            slot.join(deadline, self.policy.hurry, grace)
        if self.ray is not None:
            self.ray.shutdown()

    def hurry(self) -> None:
        """A second stop signal while stopping: workers still busy are killed now."""
        self.policy.hurry.set()

    def wake(self) -> None:
        for slot in self.trainers:
            slot.wake()

    def workers(self) -> list[dict[str, Any]]:
        return [slot.describe() for slot in self.trainers]

    def cluster(self) -> ClusterView:
        """The Ray cluster's nodes and what the workers run on them; empty without --ray."""
        if self.ray is None:
            return ClusterView()
        busy = collections.Counter(w["node"] for w in self.workers() if w["job_id"])
        return self.ray.view(busy)

    # ------------------------------------------------------------------ requests for running jobs

    def control(self, job_id: str, request: str) -> bool:
        """Pass save/sample/cancel to the worker running the job; False if none runs it."""
        if request == "cancel":
            self.policy.cancelling.add(job_id)
        return any(slot.control(job_id, request) for slot in self.trainers)

    def call(
        self,
        name: str,
        args: dict[str, Any],
        timeout: float,
        *,
        progress: Callable[[PreviewProgress], None] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Any:
        """Run a tool function in a worker: previews where the model is loaded, the rest in the
        tool worker, so they never wait for a training step. `progress` hears the worker's
        reports; once `cancelled()` (the client went away) the worker is told to stop."""
        if name == "preview":
            if not self.trainers:
                raise Unavailable(
                    "this daemon runs no training worker (--workers 0), so it cannot render previews."
                )
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
