"""Multi-process training with torch.distributed, started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT in the environment): gloo on CPUs, NCCL on GPUs.

Gradients are averaged with one bucketed all-reduce per optimiser step instead of wrapping the model
in DistributedDataParallel: the step recomputes the towers once per micro-batch (accumulation) and
calls them outside `model.forward`, which DDP's hooks would not see; one all-reduce after the last
micro-batch is what DDP's `no_sync` + final sync does, with less machinery.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False  # we called init_process_group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a plain run."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))))


def start(device: torch.device) -> World:
    """Join the process group torchrun set up (no-op for one process). NCCL needs one GPU per process:
    a CUDA device becomes cuda:LOCAL_RANK."""
    rank, world_size, local_rank = env_world()
    if world_size <= 1:
        return World()
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started = True
    return World(dist.get_rank(), dist.get_world_size(), local_rank, started)


def device_for(world_local_rank: int, device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        torch.cuda.set_device(world_local_rank)
        return torch.device("cuda", world_local_rank)
    return device


def broadcast_params(model: torch.nn.Module, world: World) -> None:
    """Every rank starts from rank 0's weights (they are built seeded, this makes sure)."""
    if world.distributed:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def average_gradients(params, world: World, bucket_elements: int = 1 << 24) -> None:
    """Mean of every gradient over the ranks, all-reduced in flat buckets of up to 16M values (64 MB)."""
    if not world.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list = []
    size = 0
    for g in grads + [None]:
        if g is not None and (not bucket or size + g.numel() <= bucket_elements):
            bucket.append(g)
            size += g.numel()
            continue
        if bucket:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat /= world.world_size
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
        bucket, size = ([g], g.numel()) if g is not None else ([], 0)


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def stop(world: World) -> None:
    if world.started_here and dist.is_initialized():
        dist.destroy_process_group()
