"""Data parallelism and stopping: which process this is, DDP set-up and teardown, and a Ctrl-C every rank obeys.

Under `torchrun --nproc_per_node N` each process joins one process group (NCCL on GPUs, gloo on CPUs); alone, a
process is rank 0 of 1 and none of this does anything.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slmkit.train.perf import pick_device


@dataclass
class World:
    rank: int
    size: int
    device: torch.device
    owns_group: bool  # we started the process group, so we end it

    @property
    def master(self) -> bool:
        """Rank 0 writes files, logs and evaluates; the other ranks only train."""
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the steps call: DDP averages gradients across ranks in backward."""
        if self.size == 1:
            return model
        ids = [self.device] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def average(self, t: torch.Tensor) -> None:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.AVG)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (all ranks must call this at the same step)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def join(device: str = "auto") -> World:
    """This process's place: joins torchrun's process group when WORLD_SIZE > 1, and picks its device (with
    CUDA, the GPU of its LOCAL_RANK)."""
    owns = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if dist.is_initialized() else 0)
        torch.cuda.set_device(dev)
    return World(rank, size, dev, owns)


class StopSignals:
    """While active, Ctrl-C and SIGTERM set `signal` instead of raising, so the step in flight finishes and the
    loop saves a checkpoint before it stops. Only the master listens; every rank stops at the same step because
    the loop asks `World.any` whether the master caught one."""

    def __init__(self, enabled: bool):
        self.enabled, self.signal, self._previous = enabled, None, {}

    def _catch(self, signum, _frame) -> None:
        self.signal = signum

    def __enter__(self) -> StopSignals:
        if self.enabled:
            self._previous = {s: signal.signal(s, self._catch) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
