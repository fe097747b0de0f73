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
   (1 + `repeats`). The epoch's batches are shuffled; when a dataset sets `probability`, they are
   interleaved instead as SimpleTuner interleaves them: each next batch comes from a source that has
   batches left, picked with chance in proportion to its `probability` (1.0 where unset), so
   `probability` changes the order, never how often a dataset is seen per epoch.
3. Rank r of `world_size` takes samples [r x batch_size, (r + 1) x batch_size) of every global
   batch: every rank gets the same number of batches, all of one shape, and the global sequence
   of samples depends on the global batch size only, not on how it is split across ranks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from shared.errors import UserError


@dataclass(frozen=True, eq=False)
class Source:
    """What the plan needs to know about one cache's training rows (arrays: ~6 bytes per row)."""

    name: str  # dataset id, for messages and seeds
    sample_ids: Sequence  # per row; only hashed into the signature
    shape_ids: np.ndarray  # [rows] int32: rows with equal ids share a shape (target and reference sizes)
    repeats: int = 0  # extra passes per epoch (SimpleTuner's `repeats`)
    probability: float | None = None  # relative weight; None: mix by size

    @classmethod
    def from_shapes(cls, name: str, sample_ids: Sequence, shapes: Sequence[tuple], **kwargs) -> Source:
        """A source from one hashable shape per row (e.g. (height, width, ((ref_h, ref_w), ...)))."""
        table: dict[tuple, int] = {}
        ids = np.array([table.setdefault(shape, len(table)) for shape in shapes], dtype=np.int32)
        return cls(name, sample_ids, ids, **kwargs)

    @property
    def digest(self) -> str:
        """Changes when the rows or their shapes do."""
        ids = np.asarray(self.sample_ids)
        data = ids.tobytes() if ids.dtype.kind in "SV" else json.dumps(list(map(str, ids))).encode()
        return hashlib.sha256(data + self.shape_ids.astype(np.int32).tobytes()).hexdigest()


@dataclass(frozen=True)
class Slot:
    """One sample of a global batch: row `row` of source `source`."""

    source: int
    row: int


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
        parts = [(s.name, s.digest, s.repeats, s.probability) for s in self.sources]
        if self.weights is not None:
            parts.append("interleaved by probability")  # since the quotas stopped following it
        # Changes whenever the plan would: rows, shapes, mixing, global batch size, seed.
        self.signature = hashlib.sha256(json.dumps([parts, self.global_batch, seed]).encode()).hexdigest()[:16]

    def _quotas(self) -> list[int]:
        if any(s.probability is not None and s.probability <= 0 for s in self.sources):
            raise UserError("every dataset's 'probability' must be positive (leave it out for 1.0)")
        return [n * (1 + s.repeats) for n, s in zip(self.own_counts, self.sources, strict=True)]

    @property
    def weights(self) -> list[float] | None:
        """Each source's interleaving weight, or None when no dataset sets `probability` (a plain shuffle)."""
        if all(s.probability is None for s in self.sources):
            return None
        return [1.0 if s.probability is None else s.probability for s in self.sources]

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The global batches of one epoch, in order: (source [n], rows [n, global_batch])."""
        return _epoch(self, epoch)

    def global_batch_at(self, position: int) -> list[Slot]:
        """Global batch number `position`, counted from the start of training."""
        epoch, index = divmod(position, self.per_epoch)
        sources, rows = self.epoch(epoch)
        return [Slot(int(sources[index]), int(r)) for r in rows[index]]

    def rank_batch(self, position: int, rank: int) -> list[Slot]:
        """Rank `rank`'s samples at global step `position`: its slice of that global batch."""
        slots = self.global_batch_at(position)
        return slots[rank * self.batch_size : (rank + 1) * self.batch_size]


def _rng(text: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))


@lru_cache(maxsize=8)
def _own_pass(order: TrainOrder, source: int, n: int) -> np.ndarray:
    """Pass `n` over one source: shuffled, bucketed by shape, cut into full global batches: rows [batches, size]."""
    src = order.sources[source]
    rng = _rng(f"{order.seed}:pass:{src.name}:{n}")
    rows = rng.permutation(len(src.shape_ids)).astype(np.int32)  # 4 bytes per row: a million rows, 4 MB
    shapes = src.shape_ids[rows]
    grouped = rows[np.argsort(shapes, kind="stable")]  # by shape, shuffled within each
    counts = np.bincount(shapes)
    size = order.global_batch
    batches, start = [], 0
    for count in counts[counts > 0]:
        members = grouped[start : start + count]
        start += count
        n_batches = -(-count // size)  # ceil: the short batch is filled from the bucket's start
        batches.append(members[np.arange(n_batches * size) % count].reshape(n_batches, size))
    batches = np.concatenate(batches)
    return batches[rng.permutation(len(batches))]


@lru_cache(maxsize=4)
def _epoch(order: TrainOrder, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    sources, rows = [], []
    for source, quota in enumerate(order.quotas):
        # Batches k of the source's own endless stream: its pass k // count, batch k % count.
        count = order.own_counts[source]
        for k in range(epoch * quota, (epoch + 1) * quota, count):
            n, first = divmod(k, count)
            take = min(count - first, (epoch + 1) * quota - k)
            rows.append(_own_pass(order, source, n)[first : first + take])
            sources.append(np.full(take, source, dtype=np.int32))
    sources, rows = np.concatenate(sources), np.concatenate(rows)
    rng = _rng(f"{order.seed}:epoch:{epoch}")
    if order.weights is None:
        permutation = rng.permutation(len(sources))
    else:
        # Picking, at each step, a source with batches left with chance proportional to its weight is the
        # order of arrival times of independent Poisson streams of rate `weight`: the k-th batch of a
        # source arrives at the sum of k exponential gaps of mean 1 / weight (memorylessness).
        rate = np.asarray(order.weights)[sources]
        gaps = rng.exponential(size=len(sources)) / rate
        arrival = np.zeros(len(sources))
        for source in range(len(order.quotas)):  # each source's batches keep their own stream order
            mine = np.flatnonzero(sources == source)
            arrival[mine] = np.cumsum(gaps[mine])
        permutation = np.argsort(arrival, kind="stable")
    return sources[permutation], rows[permutation]
