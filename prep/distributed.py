"""The ranks of a distributed cache build: accelerate's `PartialState` joins the process group that the
launcher (torchrun or accelerate launch) describes; `Ranks` is what the build asks of it.

With one process everything here is a no-op. With several, each rank encodes a disjoint share and
writes its own shards; rank 0 plans the work before and writes the manifest after.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object


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
        return broadcast_object_list([obj], from_process=0)[0]

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        return gather_object([obj])  # one item per rank

    def barrier(self) -> None:
        if self.world > 1:
            PartialState().wait_for_everyone()


def init_ranks(device: str) -> tuple[Ranks, str]:
    """This process's rank (one process: rank 0 of 1, no process group) and its device: with `cuda`, its own GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Ranks(), device
    state = PartialState(cpu=device == "cpu")  # gloo on CPU, nccl on GPUs
    if device.startswith("cuda"):
        device = str(state.device)
    else:  # ranks on one host share its cores
        per_host = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_host))
    return Ranks(state.process_index, state.num_processes, state.local_process_index), device
