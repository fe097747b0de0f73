"""Batches from the cache: the only data `train` ever reads (never a raw image).

Members are read by the manifest's byte offsets and decoded with safetensors. Each epoch's
order is a seeded permutation; batches hold samples of one shape (target size and reference
sizes), prompts padded to the longest with a mask. Every rank takes the same number of
batches (the remainder is dropped) so no collective waits on a rank without data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.cache_format import (
    embeds_from_bytes,
    latents_from_bytes,
    read_cache_info,
    read_manifest,
    read_member,
)
from shared.errors import UserError


@dataclass
class Batch:
    target: torch.Tensor  # [B, C, H/s, W/s] clean target latents
    references: list[torch.Tensor]  # one [B, C, h/s, w/s] per reference
    prompt: torch.Tensor  # [B, L, D] VL embedding of one caption per sample
    prompt_mask: torch.Tensor | None  # [B, L] 1 = token, 0 = padding; None when nothing is padded

    def to(self, device: torch.device) -> Batch:
        mask = None if self.prompt_mask is None else self.prompt_mask.to(device)
        return Batch(self.target.to(device), [r.to(device) for r in self.references], self.prompt.to(device), mask)


class CacheReader:
    """The training rows of one cache and a way to load any of them."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self.info = read_cache_info(self.cache_dir)
        self.rows = [r for r in read_manifest(self.cache_dir) if r["split"] == "train"]
        if not self.rows:
            raise UserError(f"{self.cache_dir}: the cache holds no training samples")

    def load(self, row: dict) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
        """(target [C, H, W], references [[C, h, w], ...], embeds {"prompt.i": [L, D], ...}) of one row."""
        target, references = latents_from_bytes(read_member(self.cache_dir, row, "latents.safetensors"))
        embeds = embeds_from_bytes(read_member(self.cache_dir, row, "embeds.safetensors"))
        return target, references, embeds


def shape_key(row: dict) -> tuple:
    """Samples with equal keys can share a batch."""
    return (row["height"], row["width"], tuple(tuple(s) for s in row["ref_sizes"]))


def epoch_batches(
    readers: list[CacheReader], batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[tuple[int, dict]]]:
    """This rank's batches for one epoch: lists of (reader index, row), one shape per batch."""
    rng = random.Random(seed * 1_000_003 + epoch)
    rows = [(i, row) for i, reader in enumerate(readers) for row in reader.rows]
    rng.shuffle(rows)
    buckets: dict[tuple, list] = {}
    for item in rows:
        buckets.setdefault(shape_key(item[1]), []).append(item)
    batches = [b[i : i + batch_size] for b in buckets.values() for i in range(0, len(b) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    per_rank = len(batches) // world_size  # equal work on every rank; the remainder is dropped
    if per_rank == 0:
        raise UserError(
            f"{len(rows)} samples make {len(batches)} full batch(es) of {batch_size} with equal shapes: too few for "
            f"{world_size} process(es); lower train_batch_size or add samples"
        )
    return batches[rank * per_rank : (rank + 1) * per_rank]


def collate(readers: list[CacheReader], items: list[tuple[int, dict]], rng: random.Random) -> Batch:
    """Load and stack one batch; each sample contributes one of its captions, picked by `rng`."""
    targets, references, prompts = [], [], []
    for reader_index, row in items:
        target, refs, embeds = readers[reader_index].load(row)
        targets.append(target)
        references.append(refs)
        prompts.append(embeds[f"prompt.{rng.randrange(len(row['prompt_lens']))}"])
    longest = max(p.shape[0] for p in prompts)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    padded = torch.zeros(len(prompts), longest, prompts[0].shape[1], dtype=prompts[0].dtype)
    for i, p in enumerate(prompts):
        padded[i, : p.shape[0]] = p
        mask[i, : p.shape[0]] = 1
    return Batch(
        target=torch.stack(targets),
        references=[torch.stack([refs[j] for refs in references]) for j in range(len(references[0]))],
        prompt=padded,
        prompt_mask=None if bool(mask.all()) else mask,
    )


def batch_stream(
    readers: list[CacheReader], batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> Iterator[Batch]:
    """Endless batches for this rank, epoch after epoch."""
    rng = random.Random(seed + 7919 * rank)
    epoch = 0
    while True:
        for items in epoch_batches(readers, batch_size, seed, epoch, rank, world_size):
            yield collate(readers, items, rng)
        epoch += 1


def batches_per_epoch(readers: list[CacheReader], batch_size: int, world_size: int) -> int:
    return len(epoch_batches(readers, batch_size, seed=0, epoch=0, rank=0, world_size=world_size))
