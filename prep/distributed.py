"""The ranks of a distributed cache build, from torch.distributed (launched by torchrun or accelerate).

With one process everything here is a no-op. With several, each rank encodes a disjoint share and
writes its own shards; rank 0 plans the work before and writes the manifest after.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard_prefix(self) -> str:
        """Shard names of this rank (`rankNN-000000.tar`), so that ranks never write the same file."""
        return f"rank{self.rank:02d}-" if self.world > 1 else ""

    def share(self, items: list) -> list:
        """This rank's items: every world-th, so ranks get balanced, disjoint shares."""
        return items[self.rank :: self.world]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_ranks(device: str) -> tuple[Ranks, str]:
    """Join the process group that the launcher describes (WORLD_SIZE, RANK, LOCAL_RANK); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu":  # ranks on one host share its cores
        per_host = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_host))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank), device
