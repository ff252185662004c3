"""Data-parallel training across processes, as `accelerate launch --num_processes N` starts them.

The launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; each process trains
on its share of every update's micro-batches, and gradients are averaged before the optimizer
step. The LoCon patches the base model's layers rather than being called as a module, so DDP's
forward-driven wrapper does not fit; averaging flattened gradient buckets is the same arithmetic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

_BUCKET_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_from_env() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return World(
        rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def average_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    if world.size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if (
            g is not None
            and size + g.numel() * g.element_size() <= _BUCKET_BYTES
            or (g is not None and not bucket)
        ):
            bucket.append(g)
            size += g.numel() * g.element_size()
            continue
        if bucket:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world.size
            for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(synced)
        bucket, size = ([g], g.numel() * g.element_size()) if g is not None else ([], 0)


def pick_device(requested: str | None, world: World) -> torch.device:
    """`auto` (or None): this process's GPU when there is one, else the CPU."""
    requested = requested or "auto"
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", world.local_rank)
    return torch.device(requested)
