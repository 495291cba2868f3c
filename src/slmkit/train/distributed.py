"""Data parallelism and stopping: which process this is, DDP or FSDP set-up and teardown, and a Ctrl-C every rank
obeys.

Under `torchrun --nproc_per_node N` each process joins one process group (NCCL on GPUs, gloo on CPUs); alone, a
process is rank 0 of 1 and none of this does anything.

Two ways to split the work (`--parallel`):
- ddp: every rank holds the whole model and optimizer; DistributedDataParallel averages the gradients.
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`, each transformer block a unit, then the whole model): every
  rank holds 1/N of the weights, gradients and AdamW state, and gathers a block's weights only while it computes
  it, for models whose weights and optimizer state do not fit one device. Every rank then takes part in each
  forward pass (validation too) and in gathering the whole model and optimizer state for a checkpoint
  (`full_state`), which is saved in exactly the single-process format, so a sharded run resumes on one process
  and the other way round (`load_full_state`).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slmkit.train.perf import pick_device

PARALLEL = ("ddp", "fsdp")


@dataclass
class World:
    rank: int
    size: int
    device: torch.device
    owns_group: bool  # we started the process group, so we end it
    sharded: bool = False  # FSDP: the model's parameters are DTensor shards (`shard`)

    @property
    def master(self) -> bool:
        """Rank 0 writes files, logs and evaluates; the other ranks only train."""
        return self.rank == 0

    def shard(self, model: torch.nn.Module) -> None:
        """FSDP2 in place: each block of `model.layers` a unit, then the rest (embeddings, norm, head). Before the
        optimizer is made: it must hold the shards."""
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        self.sharded = True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the steps call: DDP averages gradients across ranks in backward (FSDP's sharded module
        reduce-scatters them itself)."""
        if self.size == 1 or self.sharded:
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


def full_state(model: torch.nn.Module, opt) -> tuple[dict | None, dict | None]:
    """A sharded model's whole state dict and its optimizer's, in a single process's format ({"state": {pid:
    {...}}, "param_groups": [...]}, parameters numbered as the optimizer's groups list them), on rank 0's CPU (the
    other ranks get None: it is not copied to them). Every rank must call it (it gathers)."""
    from torch.distributed.checkpoint import state_dict as dcp
    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = dcp.get_model_state_dict(model, options=options)
    named = dcp.get_optimizer_state_dict(model, opt, options=options)
    if not named:
        return None, None
    fqns = [fqn for group in named["param_groups"] for fqn in group["params"]]
    pid = {fqn: i for i, fqn in enumerate(fqns)}
    groups, at = [], 0
    for group in named["param_groups"]:
        groups.append({**group, "params": list(range(at, at + len(group["params"])))})
        at += len(group["params"])
    return weights, {"state": {pid[fqn]: s for fqn, s in named["state"].items()}, "param_groups": groups}


def load_full_state(model: torch.nn.Module, opt, weights: dict, per_param: dict[int, dict]) -> None:
    """The inverse of `full_state` on every rank: each takes its shards of the whole `weights` and of the
    optimizer state `per_param` ({pid: {name: value}})."""
    from torch.distributed.checkpoint import state_dict as dcp
    options = dcp.StateDictOptions(full_state_dict=True)
    dcp.set_model_state_dict(model, weights, options=options)
    template = dcp.get_optimizer_state_dict(model, opt, options=options)  # the groups, by parameter name
    fqns = [fqn for group in template["param_groups"] for fqn in group["params"]]
    dcp.set_optimizer_state_dict(model, opt, {"state": {fqns[pid]: s for pid, s in per_param.items()},
                                          "param_groups": template["param_groups"]}, options=options)


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
