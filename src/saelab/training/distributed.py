"""Data parallelism under torchrun: every rank holds the whole SAE, reads its slice of each
global batch, and gradients are averaged with one all-reduce per step (gloo on CPU, NCCL on
GPU). Without torchrun this is a one-process world and costs nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def slice(self, batch_size: int) -> slice:
        """This rank's rows of a global batch."""
        per = batch_size // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        if self.size > 1:
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat)
            flat /= self.size
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def join_world(device: str) -> World:
    """The torchrun world (process group started once), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(dist.get_rank(), dist.get_world_size())
