"""One torchrun start-up for every verb that runs on many processes (cache, train, compare,
study).

Without torchrun (WORLD_SIZE unset or 1) this is a world of one and costs nothing. Under
torchrun the process group starts once, with one rule for the backend (NCCL when the work
runs on CUDA, gloo otherwise) and one timeout, and each rank gets its own GPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# Ranks wait for each other at barriers: a rank with no shard left to cache waits for the
# slowest one for as long as that takes, so the timeout is long. A crashed rank does not
# hang the others that long: torchrun stops the whole group when one rank fails.
TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started."""

    rank: int
    size: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device this rank works on: under torchrun, `cuda` means this rank's GPU."""
        return f"cuda:{self.local_rank}" if self.size > 1 and device == "cuda" else device

    def slice(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of `batch_size` rows: consecutive, every row
        on some rank, sizes differing by at most one."""
        return slice(self.rank * batch_size // self.size,
                     (self.rank + 1) * batch_size // self.size)

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average `tensors` over the ranks, in place, in one collective."""
        if self.size > 1:
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat)
            flat /= self.size
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def join_world(device: str) -> World:
    """The torchrun world (the process group started once), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), local_rank)
