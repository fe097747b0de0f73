"""Batches from the cache: the only data `train` ever reads (never a raw image).

`TrainLoader` streams this rank's batches in the order `train.sampler.TrainOrder` fixes. Members
are read by the manifest's byte offsets (one ranged read per sample) from a local path or any
fsspec URL (`s3://`, `gs://`, `https://`, ...), checked against the manifest's sha256 and decoded
with safetensors (never pickle). DataLoader workers prepare batches ahead; batch p goes to
worker p mod W and the DataLoader returns them in order, so the sequence does not depend on W,
and memory is bounded by the prefetch depth. A corrupt or missing member is reported (shard,
sample id, reason), counted and replaced by a good sample of the same shape, never a crash.

The loader's state is one number, the count of batches handed out: `load_state_dict` continues
with exactly the next batch, computing that epoch's plan directly (no replay).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shared.cache import (
    DROPOUT,
    DROPOUT_COLUMNS,
    DROPOUT_SHARD,
    EMBEDS,
    LATENTS,
    TRAIN_COLUMNS,
    CacheStore,
    Embeddings,
    Latents,
    member_column,
)
from shared.errors import UserError
from train.batch import Batch, collate
from train.garbage import collect_in_worker
from train.sampler import Slot, Source, TrainOrder

log = logging.getLogger(__name__)


class CorruptSample(Exception):
    """A member that is missing, truncated, or does not match the manifest's sha256."""


@dataclass
class Row:
    """What loading one sample needs, built on demand from the columns."""

    sample_id: str
    shard: str
    spans: dict[str, tuple[int, int, bytes]]  # member -> (offset, size, sha256)
    n_prompts: int
    dropout: tuple[str, int, int, bytes] | None = None  # its dropout record: (shard, offset, size, sha256)


SAMPLE_ID_BYTES = 10  # a sample id is 20 hex characters (prep.scan.Sample.sample_id): kept as its 10 bytes


def packed_sample_ids(ids: pa.StringArray) -> np.ndarray:
    """Sample ids as a [N] NumPy array of their 10 raw bytes each (no Python object per row)."""
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32)[ids.offset : ids.offset + len(ids) + 1]
    if len(ids) == 0:
        return np.zeros(0, dtype=f"V{SAMPLE_ID_BYTES}")
    if ids.null_count or not (np.diff(offsets) == 2 * SAMPLE_ID_BYTES).all():
        raise UserError("the manifest holds a sample id that is not 20 hex characters; rebuild the cache with `prep`")
    text = np.frombuffer(ids.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    digits = np.where(text <= ord("9"), text - ord("0"), (text | 0x20) - ord("a") + 10).astype(np.uint8)
    if (digits > 15).any():
        raise UserError("the manifest holds a sample id that is not hexadecimal; rebuild the cache with `prep`")
    packed = (digits[0::2] << 4) | digits[1::2]
    return packed.view(f"V{SAMPLE_ID_BYTES}").copy()


def sample_id_text(packed: np.void) -> str:
    return packed.tobytes().hex()


class CacheReader:
    """The training rows of one cache (local dir or fsspec URL) and a way to load any of them.

    The manifest stays in NumPy columns (about 130 bytes per row, 48 more with `dropout`; no Python
    object per row), which forked DataLoader workers share with this process instead of copying.
    With `dropout` (caption dropout is on), each row's dropout record is read too, and a cache whose
    train samples lack them is refused with the command that adds them.
    """

    def __init__(
        self,
        location: str,
        name: str = "",
        repeats: int = 0,
        probability: float | None = None,
        split: str = "train",
        dropout: bool = False,
    ):
        self.split = split  # the rows this reader holds: "train", or "eval" (previews and the held-out loss)
        self.store = CacheStore(location)
        self.location = self.store.location
        self.info = self.store.read_info()
        self.name = name or self.info["dataset_id"]  # seeds this dataset's order: the same wherever it is read from
        # Caches written before dropout records had their own shards hold the dropout in the embeddings member.
        records = DROPOUT_SHARD in self.store.manifest_columns()
        self.dropout = dropout and records  # read each row's dropout record
        self.serves_dropout = self.dropout or not records  # its samples come with their dropout embedding
        self._load_columns(repeats, probability)

    def _load_columns(self, repeats: int, probability: float | None) -> None:
        """The manifest's training rows as NumPy columns, converted one record batch at a time into
        arrays allocated once (so the transient memory is one batch's, whatever the manifest's length)."""
        joined: dict[str, np.ndarray] = {}
        shard_names: dict[str, int] = {}
        n = 0  # training rows so far
        wanted = list(TRAIN_COLUMNS) + (list(DROPOUT_COLUMNS) if self.dropout else [])
        for total, batch in self.store.iter_manifest(wanted):
            batch = batch.filter(pc.equal(batch.column("split"), self.split))
            shards = pc.dictionary_encode(batch.column("shard"))
            names = shards.dictionary.to_pylist()
            to_global = np.array([shard_names.setdefault(name, len(shard_names)) for name in names])
            prompt_lens = batch.column("prompt_lens")
            columns = {
                "sample_ids": packed_sample_ids(batch.column("sample_id")),
                "shard_index": to_global[shards.indices.to_numpy()].astype(np.int32) if len(batch) else [],
                "n_prompts": pc.list_value_length(prompt_lens).to_numpy().astype(np.int16),
                "longest": np.maximum.reduceat(prompt_lens.values.to_numpy(), prompt_lens.offsets.to_numpy()[:-1])
                if len(batch)
                else [],
                "shape": self._shape_matrix(batch),
            }
            if self.dropout:  # a row without a dropout record (train refuses such caches first) gets index -1
                dropout_shards = pc.dictionary_encode(batch.column(DROPOUT_SHARD))
                names = dropout_shards.dictionary.to_pylist()
                to_global = np.array([shard_names.setdefault(name, len(shard_names)) for name in names] + [-1])
                indices = dropout_shards.indices.fill_null(-1).to_numpy()
                columns["dropout_shard_index"] = to_global[indices].astype(np.int32)
            for member in (LATENTS, EMBEDS, DROPOUT) if self.dropout else (LATENTS, EMBEDS):
                digests = batch.column(member_column(member, "sha256"))  # fixed_size_binary(32)
                raw = np.frombuffer(digests.buffers()[1], dtype=np.uint8)[digests.offset * 32 :][: 32 * len(digests)]
                columns[f"{member}:offset"] = batch.column(member_column(member, "offset")).fill_null(0).to_numpy()
                sizes = batch.column(member_column(member, "size")).fill_null(0)
                columns[f"{member}:size"] = sizes.to_numpy().astype(np.int32)
                columns[f"{member}:sha256"] = raw.reshape(-1, 32)
            for name, values in columns.items():
                values = np.asarray(values)
                if name not in joined:  # allocated once for every row; other splits' rows leave a tail unused
                    joined[name] = np.empty((total, *values.shape[1:]), dtype=values.dtype)
                joined[name][n : n + len(batch)] = values
            n += len(batch)
        if n == 0 and self.split == "train":
            raise UserError(f"{self.location}: the cache holds no training samples")
        if n == 0:  # no eval samples here
            self.sample_ids, self.shard_names, self.largest_tokens = np.zeros(0, f"V{SAMPLE_ID_BYTES}"), [], 0
            return
        joined = {name: values[:n] for name, values in joined.items()}
        self.sample_ids = joined["sample_ids"]  # [N] 10 raw bytes each (sample_id_text gives the hex)
        self.shard_names = list(shard_names)
        self.shard_index = joined["shard_index"]  # [N] into shard_names
        self.n_prompts = joined["n_prompts"]  # [N] captions per row
        # member -> (offsets [N] int64, sizes [N] int32 (a member is MBs), sha256 [N, 32] uint8)
        self.spans = {m: tuple(joined[f"{m}:{k}"] for k in ("offset", "size", "sha256")) for m in (LATENTS, EMBEDS)}
        if self.dropout:  # [N] into shard_names, and (offsets, sizes, sha256) as for the other members
            self.dropout_shard_index = joined["dropout_shard_index"]
            self.dropout_span = tuple(joined[f"{DROPOUT}:{k}"] for k in ("offset", "size", "sha256"))
        shape = joined["shape"]  # [N, 2 + 2 x refs]: height, width, then each reference's
        # Shape ids by hashing each row's shape (Arrow's dictionary encoding: linear, unlike a row sort).
        packed = np.ascontiguousarray(shape, dtype=np.int32)
        keys = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(packed.shape[1] * 4), len(packed), [None, pa.py_buffer(packed)]
        )
        self.shape_ids = pc.dictionary_encode(keys).indices.to_numpy().astype(np.int32)  # [N], first seen = 0
        shape = shape.astype(np.int64)  # pixel counts overflow int32 past 46k x 46k
        pixels = shape[:, 0] * shape[:, 1] + (shape[:, 2::2] * shape[:, 3::2]).sum(axis=1)
        # Transformer tokens: 16 pixels a side per token (the VAE's 8 x the 2x2 packing), plus the caption.
        self.largest_tokens = int((pixels // 256 + joined["longest"]).max())
        self.source = Source(self.name, self.sample_ids, self.shape_ids, repeats, probability)

    @staticmethod
    def _shape_matrix(batch: pa.RecordBatch) -> np.ndarray:
        """[rows, 2 + 2 x refs] int32: each row's target height, width, then each reference's."""
        refs = batch.column("ref_sizes")  # list<list<int32>>: [[h, w] per reference]
        per_row = pc.list_value_length(refs).to_numpy()
        if len(set(per_row.tolist())) > 1:
            raise UserError("the cache's samples have different numbers of references; rebuild it with `prep`")
        n_refs = int(per_row[0]) if len(per_row) else 0
        sizes = refs.flatten().flatten().to_numpy().reshape(len(batch), 2 * n_refs)
        hw = np.stack([batch.column("height").to_numpy(), batch.column("width").to_numpy()], axis=1)
        return np.concatenate([hw, sizes], axis=1).astype(np.int32)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def row(self, index: int) -> Row:
        spans = {m: (int(o[index]), int(n[index]), d[index].tobytes()) for m, (o, n, d) in self.spans.items()}
        sample_id = sample_id_text(self.sample_ids[index])
        dropout = None
        if self.dropout:
            offsets, sizes, digests = self.dropout_span
            shard = self.shard_names[self.dropout_shard_index[index]] if self.dropout_shard_index[index] >= 0 else ""
            dropout = (shard, int(offsets[index]), int(sizes[index]), digests[index].tobytes())
        return Row(sample_id, self.shard_names[self.shard_index[index]], spans, int(self.n_prompts[index]), dropout)

    def load(self, row: Row) -> tuple[Latents, Embeddings]:
        """The latents and embeddings of one row.

        Raises CorruptSample when a member is missing, short, fails its sha256 or does not decode.
        """
        # Both members in one ranged read: they are neighbours in the tar (one header apart).
        start = min(offset for offset, _, _ in row.spans.values())
        end = max(offset + size for offset, size, _ in row.spans.values())
        try:
            span = self.store.read_range(row.shard, start, end)
        except (OSError, ValueError) as err:  # missing shard, network error after fsspec's retries
            raise CorruptSample(f"cannot read: {err}") from None
        data = {}
        for member, (offset, size, sha256) in row.spans.items():
            data[member] = span[offset - start : offset - start + size]
            if len(data[member]) != size:
                raise CorruptSample(f"{member} truncated ({len(data[member])} of {size} bytes)")
            if hashlib.sha256(data[member]).digest() != sha256:
                raise CorruptSample(f"{member} does not match the manifest's sha256")
        dropout = None
        if row.dropout is not None and row.dropout[0]:  # its own record, in a dropout shard: one more ranged read
            shard, offset, size, sha256 = row.dropout
            try:
                dropout = self.store.read_range(shard, offset, offset + size)
            except (OSError, ValueError) as err:
                raise CorruptSample(f"cannot read its dropout record: {err}") from None
            if len(dropout) != size or hashlib.sha256(dropout).digest() != sha256:
                raise CorruptSample(f"{DROPOUT} truncated or does not match the manifest's sha256")
        try:
            latents, embeds = Latents.from_bytes(data[LATENTS]), Embeddings.from_bytes(data[EMBEDS], dropout)
        except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt member
            raise CorruptSample(f"does not decode: {err}") from None
        if row.dropout is not None and embeds.dropout is None and not embeds.alone:
            raise CorruptSample("has no dropout embedding (the manifest was changed after the build)")
        tensors = [latents.target, *latents.references, *embeds.tensors()]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise CorruptSample("holds NaN or inf values (its encoding went wrong); rebuild it with `prep build-cache`")
        return latents, embeds


class _BatchStream(IterableDataset):
    """Batches `start`, `start` + 1, ... of one rank; in a DataLoader, worker w makes every W-th."""

    def __init__(self, readers: list[CacheReader], order: TrainOrder, rank: int, start: int, caption_dropout: float):
        self.readers, self.order, self.rank, self.start = readers, order, rank, start
        self.caption_dropout = caption_dropout

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        bad: dict[tuple[int, int], str] = {}  # known-bad samples of this worker, so each is read once
        for position in itertools.count(self.start + worker, workers):
            yield position, self._batch(position, bad)

    def _batch(self, position: int, bad: dict[tuple[int, int], str]) -> Batch:
        wanted = self.order.rank_batch(position, self.rank)
        loaded, skipped = [], []
        for slot in wanted:
            if (sample := self._load(slot, bad)) is not None:
                loaded.append(sample)
            else:
                skipped.append(bad[(slot.source, slot.row)])
        if len(loaded) < len(wanted):  # a corrupt sample's place goes to a good one of the same shape
            for slot in self._same_shape(wanted[0]):
                if len(loaded) == len(wanted):
                    break
                if (slot.source, slot.row) in bad:
                    continue
                if (sample := self._load(slot, bad)) is not None:
                    loaded.append(sample)
                else:
                    skipped.append(bad[(slot.source, slot.row)])
        if not loaded:
            raise UserError(
                f"every sample of one shape is unreadable ({'; '.join(skipped[:3])}); "
                "run `prep verify` on the cache and rebuild it with `prep build-cache`"
            )
        while len(loaded) < len(wanted):  # fewer good samples of this shape than a batch: repeat them
            loaded.append(loaded[len(loaded) % len(loaded)])
        rng = random.Random(f"{self.order.seed}:caption:{position}:{self.rank}")
        return collate(loaded, rng, skipped, self.caption_dropout)

    def _load(self, slot: Slot, bad: dict[tuple[int, int], str]) -> tuple | None:
        """(row, latents, embeddings), or None for a corrupt sample (remembered in `bad`)."""
        key = (slot.source, slot.row)
        if key in bad:
            return None
        reader = self.readers[slot.source]
        row = reader.row(slot.row)
        try:
            return (row, *reader.load(row))
        except CorruptSample as err:
            bad[key] = f"{reader.location}/{row.shard}: sample {row.sample_id}: {err}"
            return None

    def _same_shape(self, slot: Slot) -> Iterator[Slot]:
        """Every slot of the same source with the same shape as `slot`, in manifest order."""
        shapes = self.readers[slot.source].shape_ids
        for row in np.flatnonzero(shapes == shapes[slot.row]):
            yield Slot(slot.source, int(row))


class TrainLoader:
    """This rank's endless stream of batches, resumable at any batch.

    `workers` DataLoader processes read ahead `prefetch` batches each (memory bound: about
    workers x prefetch batches). Iterating after `load_state_dict` continues where the state was taken.
    """

    def __init__(
        self,
        readers: list[CacheReader],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        prefetch: int = 2,
        caption_dropout: float = 0.0,
    ):
        self.readers, self.rank, self.workers, self.prefetch = readers, rank, workers, prefetch
        if caption_dropout > 0 and not all(reader.serves_dropout for reader in readers):
            raise ValueError("caption dropout needs readers opened with dropout=True (CacheReader)")
        self.caption_dropout = caption_dropout
        self.order = TrainOrder([r.source for r in readers], batch_size, world_size, seed)
        self.position = 0  # batches handed out so far (the same on every rank)
        # How far resumes onto a changed plan moved `position` (the same epoch and fraction of it in the new plan):
        # `position` is the batches the optimizer steps took plus this, which a checkpoint's check relies on.
        self.shift = 0
        self.skipped = 0  # samples replaced because they could not be read

    @property
    def batches_per_epoch(self) -> int:
        return self.order.per_epoch

    @property
    def epoch(self) -> int:
        return self.position // self.order.per_epoch

    def largest_batch_tokens(self, batch_size: int) -> int:
        """Transformer tokens of this rank's largest possible batch: image tokens (target and references,
        16 pixels a side each: the VAE's 8 times the 2x2 packing) plus the longest caption, times the batch."""
        return max(reader.largest_tokens for reader in self.readers) * batch_size

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "shift": self.shift,
            "epoch": self.epoch,
            "per_epoch": self.order.per_epoch,
            "skipped": self.skipped,
            "seed": self.order.seed,
            "global_batch": self.order.global_batch,
            "signature": self.order.signature,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch `state` was taken at; the exact next one if the plan is unchanged.

        If the caches, their mixing, the seed or the global batch size changed since, the plan
        differs: continue at the same epoch and the same fraction of it, and say so.
        """
        self.skipped = state.get("skipped", 0)
        self.shift = state.get("shift", 0)  # states written before it: never moved
        if state["signature"] == self.order.signature:
            self.position = state["position"]
            return
        fraction = (state["position"] % state["per_epoch"]) / state["per_epoch"]
        self.position = state["epoch"] * self.order.per_epoch + round(fraction * self.order.per_epoch)
        self.shift += self.position - state["position"]
        log.warning(
            "note: the caches, dataset mixing, seed or global batch size changed since this state was saved; "
            f"continuing at epoch {state['epoch']}, batch {self.position % self.order.per_epoch} of the new plan"
        )

    def __iter__(self) -> Iterator[Batch]:
        stream = _BatchStream(self.readers, self.order, self.rank, self.position, self.caption_dropout)
        loader = DataLoader(
            stream,
            batch_size=None,  # the stream makes whole batches
            num_workers=self.workers,
            prefetch_factor=self.prefetch if self.workers else None,
            persistent_workers=False,
            worker_init_fn=collect_in_worker,  # train/garbage.py: the training process runs without it
            # Its own generator: a DataLoader draws a base seed from the global RNG otherwise, which
            # would shift LoRA dropout after a resume (the global RNG state is part of a checkpoint).
            generator=torch.Generator().manual_seed(self.order.seed),
        )
        reported: set[str] = set()
        for position, batch in loader:
            assert position == self.position, "batches arrived out of order"
            self.position += 1
            for line in set(batch.skipped) - reported:
                log.warning(
                    "warning: skipped unreadable sample %s; `prep verify` checks the whole cache",
                    line,
                    extra={"all_ranks": True},
                )
                reported.add(line)
            self.skipped += len(batch.skipped)
            yield batch
