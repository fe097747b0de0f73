"""Which samples go in which batch, on which rank, at which step: a pure function of the manifest.

No I/O and no hidden state: `TrainOrder.rank_batch(position, rank)` is computed from
(seed, manifest rows, batch sizes) alone, so any number of DataLoader workers, a resumed run and
an uninterrupted one all see the same batches.

The plan, per epoch:

1. Each source (one cache = one main dataset) has its own endless stream of *global batches*:
   its rows shuffled per pass, grouped by shape (target size and reference sizes), cut into
   batches of `global_batch` = `batch_size` x `world_size` samples. A bucket's last, short batch is
   filled with samples from the start of the same bucket (so every sample is seen each pass and a
   bucket smaller than a batch still trains); batches of all buckets are then shuffled together,
   so buckets are drawn in proportion to their sizes.
2. An epoch takes `quota[s]` global batches from each source's stream: its own batch count x
   (1 + `repeats`) when mixing by size (the default), or shares of the same total in proportion to
   each dataset's `probability` when any dataset sets one. The epoch's batches are shuffled.
3. Rank r of `world_size` takes samples [r x batch_size, (r + 1) x batch_size) of every global
   batch: every rank gets the same number of batches, all of one shape, and the global sequence
   of samples depends on the global batch size only, not on how it is split across ranks.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import lru_cache

from shared.errors import UserError


@dataclass(frozen=True)
class Source:
    """What the plan needs to know about one cache's training rows."""

    name: str  # dataset id, for messages
    sample_ids: tuple[str, ...]
    shapes: tuple[tuple, ...]  # per row: (height, width, ((ref_h, ref_w), ...))
    repeats: int = 0  # extra passes per epoch (SimpleTuner's `repeats`)
    probability: float | None = None  # relative weight; None: mix by size


@dataclass(frozen=True)
class Slot:
    """One sample of a global batch: row `row` of source `source`."""

    source: int
    row: int


def shape_key(row: dict) -> tuple:
    """Samples with equal keys can share a batch: target pixels and each reference's pixels."""
    return (row["height"], row["width"], tuple(tuple(s) for s in row["ref_sizes"]))


class TrainOrder:
    """The deterministic global order of batches over epochs, and each rank's share of it."""

    def __init__(self, sources: list[Source], batch_size: int, world_size: int, seed: int):
        if not sources:
            raise UserError("no training dataset: every main dataset is the eval dataset or has no train samples")
        self.sources, self.batch_size, self.world_size, self.seed = sources, batch_size, world_size, seed
        self.global_batch = batch_size * world_size
        self.own_counts = [len(_own_pass(self, s, 0)) for s in range(len(sources))]
        self.quotas = self._quotas()
        self.per_epoch = sum(self.quotas)  # global batches per epoch = batches per rank per epoch

    def _quotas(self) -> list[int]:
        by_size = [n * (1 + s.repeats) for n, s in zip(self.own_counts, self.sources, strict=True)]
        if all(s.probability is None for s in self.sources):
            return by_size
        weights = [1.0 if s.probability is None else s.probability for s in self.sources]
        if any(w <= 0 for w in weights):
            raise UserError("every dataset's 'probability' must be positive (leave it out for 1.0)")
        total = sum(by_size)
        return [max(1, round(total * w / sum(weights))) for w in weights]

    @property
    def signature(self) -> str:
        """Changes whenever the plan would: rows, shapes, mixing, global batch size, seed."""
        parts = [(s.sample_ids, s.shapes, s.repeats, s.probability) for s in self.sources]
        text = json.dumps([parts, self.global_batch, self.seed], default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def epoch(self, epoch: int) -> list[list[Slot]]:
        """The global batches of one epoch, in order."""
        return _epoch(self, epoch)

    def global_batch_at(self, position: int) -> list[Slot]:
        """Global batch number `position`, counted from the start of training."""
        epoch, index = divmod(position, self.per_epoch)
        return self.epoch(epoch)[index]

    def rank_batch(self, position: int, rank: int) -> list[Slot]:
        """Rank `rank`'s samples at global step `position`: its slice of that global batch."""
        slots = self.global_batch_at(position)
        return slots[rank * self.batch_size : (rank + 1) * self.batch_size]


@lru_cache(maxsize=8)
def _own_pass(order: TrainOrder, source: int, n: int) -> list[list[Slot]]:
    """Pass `n` over one source: shuffled, bucketed by shape, cut into full global batches."""
    src = order.sources[source]
    rng = random.Random(f"{order.seed}:pass:{src.name}:{n}")
    rows = list(range(len(src.sample_ids)))
    rng.shuffle(rows)
    buckets: dict[tuple, list[int]] = {}
    for row in rows:
        buckets.setdefault(src.shapes[row], []).append(row)
    size = order.global_batch
    batches = []
    for members in buckets.values():
        n_batches = -(-len(members) // size)  # ceil: the short batch is filled from the bucket's start
        cycled = [members[i % len(members)] for i in range(n_batches * size)]
        batches += [[Slot(source, r) for r in cycled[i : i + size]] for i in range(0, len(cycled), size)]
    rng.shuffle(batches)
    return batches


@lru_cache(maxsize=4)
def _epoch(order: TrainOrder, epoch: int) -> list[list[Slot]]:
    batches = []
    for source, quota in enumerate(order.quotas):
        # Batches k of the source's own endless stream: its pass k // count, batch k % count.
        count = order.own_counts[source]
        batches += [_own_pass(order, source, k // count)[k % count] for k in range(epoch * quota, (epoch + 1) * quota)]
    random.Random(f"{order.seed}:epoch:{epoch}").shuffle(batches)
    return batches
