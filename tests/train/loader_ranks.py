"""Run under torchrun (gloo): each rank reads one epoch; rank 0 writes every rank's sample ids to a JSON file.

python -m torch.distributed.run --nproc_per_node 2 -m tests.train.loader_ranks CACHE BATCH_SIZE OUT.json
"""

import json
import sys

import torch.distributed as dist

from train.loader import CacheReader, TrainLoader


def main() -> None:
    cache, batch_size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = TrainLoader([CacheReader(cache)], batch_size, seed=3, rank=rank, world_size=world, workers=1)
    batches = iter(loader)
    mine = [next(batches).sample_ids for _ in range(loader.batches_per_epoch)]
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
