"""Distributed data parallel helpers: one code path for 1 process and for ``torchrun`` (multi-GPU, multi-node).

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with ``WORLD_SIZE``
> 1 :func:`setup` joins the process group (NCCL on CUDA, gloo on the CPU). Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from acecal.errors import InvalidInputError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this context created the process group (and destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks (in place, returned). CPU tensors go through a device copy for NCCL."""
        if not self.distributed:
            return t
        work = t.to(self.device) if self.device.type == "cuda" else t
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not t:
            t.copy_(work.to(t.device))
        return t

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (used for cooperative cancel)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def close(self) -> None:
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: Optional[str] = None, backend: Optional[str] = None) -> DistContext:
    """The process's distributed context from the ``torchrun`` environment (a single process without it).

    Args:
        device: "cpu", "cuda" or "cuda:N"; default CUDA when available. Under DDP with CUDA each process takes
            ``cuda:LOCAL_RANK``.
        backend: default "nccl" on CUDA, "gloo" on the CPU.
    """
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu")
    if want_cuda:
        if world > 1:
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device(device if device and ":" in str(device) else "cuda")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    ctx = DistContext(rank, world, local_rank, dev)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"))
            ctx.owns_group = True
        ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
    return ctx


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a ``DistributedDataParallel`` wrapper."""
    return (
        model.module
        if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel)
        else model
    )
