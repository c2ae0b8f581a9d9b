"""Data parallelism through torch.distributed: DDP and FSDP2, launched by ``torchrun``.

Nothing here reimplements communication; it reads torchrun's environment, starts the process
group (NCCL on CUDA, gloo on CPU), and wraps the model from outside, per block, as torchtitan
does: ``DistributedDataParallel``, or ``fully_shard`` on each transformer block then the root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place: rank, world size, and which wrapper the model got."""

    rank: int = 0
    world_size: int = 1
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(mode: str) -> World:
    """Start the process group if torchrun launched several processes; ``mode`` auto/ddp/fsdp/none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or mode == "none":
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(), mode="ddp" if mode == "auto" else mode)


def wrap(model: nn.Module, world: World) -> nn.Module:
    """Apply the data-parallel wrapper ``world.mode`` names."""
    if world.mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if world.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, world: World, sync: bool):
    """Context manager that skips gradient communication on non-final micro-batches."""
    import contextlib

    if sync or world.mode == "none":
        return contextlib.nullcontext()
    if world.mode == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)  # FSDP2; re-enabled by the final micro-batch below
    return contextlib.nullcontext()


def set_sync(model: nn.Module, world: World) -> None:
    if world.mode == "fsdp":
        model.set_requires_gradient_sync(True)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats over ranks (a no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (on every rank; rank 0 writes them)."""
    if world.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    return unwrap(model).state_dict(), optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, world: World) -> None:
    """Load an optimizer state saved by ``full_state_dicts`` (same distributed mode as the save)."""
    if world.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
