"""Saving off the training thread: step LoRAs and the full training state, atomically.

The writer thread runs no torch ops (only byte copies, hashing and file writes): a torch op on a
second thread starts a second OpenMP team, whose spinning threads halved the tiny twin's training
speed on a 2-core machine.

The training thread only copies tensors to the CPU (cheap) and hands them over; a writer thread
serialises and writes them. Step files are all written, in order. Training state is big (fp32
network plus two optimizer moments: ~1.4 GB at SDXL size), so state saves coalesce: if the writer
is still busy, a newer state replaces the one waiting, and the resume point is always the newest
state that reached the disk whole.
"""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import tensorfile


class BackgroundWriter:
    """A single writer thread with an ordered queue and a coalescing slot for state saves."""

    def __init__(self):
        self._cond = threading.Condition()
        self._jobs: list[Callable[[], None]] = []
        self._state_job: Callable[[], None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="loradrop-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._raise_pending()
            self._jobs.append(job)
            self._cond.notify()

    def submit_state(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._raise_pending()
            self._state_job = job  # replaces a state save that has not started yet
            self._cond.notify()

    def flush(self) -> None:
        """Wait until everything submitted is on disk; re-raise a writer error here."""
        with self._cond:
            while self._jobs or self._state_job or self._busy:
                self._cond.wait()
            self._raise_pending()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify()
            self._thread.join()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        _yield_to_training()
        while True:
            with self._cond:
                while not (self._jobs or self._state_job or self._closed):
                    self._cond.wait()
                if self._jobs:
                    job = self._jobs.pop(0)
                elif self._state_job:
                    job, self._state_job = self._state_job, None
                else:
                    return
                self._busy = True
            try:
                job()
            except BaseException as e:  # surfaced on the training thread at the next submit
                with self._cond:
                    self._error = e
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def _yield_to_training() -> None:
    """Lower this thread's CPU priority. Where the CPU trains (or feeds the GPU) on every core,
    a writer at equal priority preempts a compute thread, and the whole step waits for that
    one; at low priority the writer takes the cycles the compute threads leave idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: only slower, never wrong
        pass


# ---------------------------------------------------------------- training state


def capture_state(
    network, optimizer: torch.optim.Optimizer, *, step: int, extra: dict[str, Any]
) -> tuple[dict, dict]:
    """Copy everything a resume needs to the CPU: network (fp32), optimizer, RNGs, step.

    Returns (tensors, json-able info); the copy is what the writer thread serialises later.
    """
    tensors: dict[str, torch.Tensor] = {}
    tensors["net"] = network.snapshot()  # the flat fp32 buffer, in network.keys order
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"opt/{idx}/{name}"] = value.detach().to("cpu", copy=True)
            else:
                scalars.setdefault(str(idx), {})[name] = float(value) if torch.is_tensor(value) else value
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    info = {
        "step": step,
        "optimizer_scalars": scalars,
        "param_groups": opt["param_groups"],
        "python_rng": _python_rng_to_json(random.getstate()),
        "numpy_rng": _numpy_rng_to_json(np.random.get_state()),
        **extra,
    }
    return tensors, info


def write_state(path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    tensorfile.write(path, tensors, {"loradrop.training_state": json.dumps(info)})


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with tensorfile.TensorFile(path, what="a loradrop training state") as tf:
        info = json.loads(tf.metadata["loradrop.training_state"])
        return tf.read_all(), info


def restore_state(
    network, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict[str, Any]
) -> int:
    """Put a captured state back; returns the number of optimizer updates already done."""
    from .network import unflatten

    network.load_lora_state_dict(unflatten(tensors["net"], network.keys, network.shapes))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, scalars in info["optimizer_scalars"].items():
        for name, value in scalars.items():
            state.setdefault(int(idx), {})[name] = torch.tensor(value) if isinstance(value, float) else value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = info["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = info["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return int(info["step"])


def _python_rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _numpy_rng_to_json(state) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
