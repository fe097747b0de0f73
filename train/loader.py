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
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shared.cache_format import (
    CACHE_JSON,
    MANIFEST,
    embeds_from_bytes,
    latents_from_bytes,
    member_column,
    parse_cache_info,
)
from shared.errors import UserError
from train.sampler import Slot, Source, TrainOrder, shape_key


@dataclass
class Batch:
    target: torch.Tensor  # [B, C, H/s, W/s] clean target latents
    references: list[torch.Tensor]  # one [B, C, h/s, w/s] per reference
    prompt: torch.Tensor  # [B, L, D] VL embedding of one caption per sample
    prompt_mask: torch.Tensor | None  # [B, L] 1 = token, 0 = padding; None when nothing is padded
    sample_ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "shard: sample id: why" for each sample replaced

    def to(self, device: torch.device) -> Batch:
        mask = None if self.prompt_mask is None else self.prompt_mask.to(device)
        references = [r.to(device) for r in self.references]
        return Batch(self.target.to(device), references, self.prompt.to(device), mask, self.sample_ids, self.skipped)


class CorruptSample(Exception):
    """A member that is missing, truncated, or does not match the manifest's sha256."""


class CacheReader:
    """The training rows of one cache (local dir or fsspec URL) and a way to load any of them."""

    def __init__(self, location: str, name: str = "", repeats: int = 0, probability: float | None = None):
        self.location = str(location).rstrip("/")
        self._fs, self._fs_pid = None, -1
        fs, root = self.fs
        info_path, manifest_path = f"{root}/{CACHE_JSON}", f"{root}/{MANIFEST}"
        if not fs.exists(info_path):
            raise UserError(f"{self.location}: not a cache (no {CACHE_JSON}); build it with `prep build-cache`")
        self.info = parse_cache_info(fs.cat_file(info_path).decode("utf-8"), f"{self.location}/{CACHE_JSON}")
        self.name = name or self.info["dataset_id"]  # seeds this dataset's order: the same wherever it is read from
        if not fs.exists(manifest_path):
            raise UserError(f"{self.location}: no {MANIFEST}; build the cache first with `prep build-cache`")
        rows = pq.read_table(pa.BufferReader(fs.cat_file(manifest_path))).to_pylist()
        self.rows = [r for r in rows if r["split"] == "train"]
        if not self.rows:
            raise UserError(f"{self.location}: the cache holds no training samples")
        self.source = Source(
            self.name,
            tuple(r["sample_id"] for r in self.rows),
            tuple(shape_key(r) for r in self.rows),
            repeats,
            probability,
        )

    @property
    def fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, root path), opened once per process (DataLoader workers open their own)."""
        if self._fs is None or self._fs_pid != os.getpid():
            self._fs, self._root = fsspec.core.url_to_fs(self.location)
            self._fs_pid = os.getpid()
        return self._fs, self._root

    def __getstate__(self) -> dict:  # sent to DataLoader workers without the open filesystem
        return dict(self.__dict__, _fs=None, _fs_pid=-1)

    def load(self, row: dict) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
        """(target [C, H, W], references [[C, h, w], ...], embeds {"prompt.i": [L, D], ...}) of one row.

        Raises CorruptSample when a member is missing, short, fails its sha256 or does not decode.
        """
        fs, root = self.fs
        members = ("latents.safetensors", "embeds.safetensors")
        # Both members in one ranged read: they are neighbours in the tar (one header apart).
        start = min(row[member_column(m, "offset")] for m in members)
        end = max(row[member_column(m, "offset")] + row[member_column(m, "size")] for m in members)
        try:
            span = fs.cat_file(f"{root}/{row['shard']}", start=start, end=end)
        except (OSError, ValueError) as err:  # missing shard, network error after fsspec's retries
            raise CorruptSample(f"cannot read: {err}") from None
        data = {}
        for m in members:
            offset = row[member_column(m, "offset")] - start
            data[m] = span[offset : offset + row[member_column(m, "size")]]
            if len(data[m]) != row[member_column(m, "size")]:
                raise CorruptSample(f"{m} truncated ({len(data[m])} of {row[member_column(m, 'size')]} bytes)")
            if hashlib.sha256(data[m]).hexdigest() != row[member_column(m, "sha256")]:
                raise CorruptSample(f"{m} does not match the manifest's sha256")
        try:
            target, references = latents_from_bytes(data["latents.safetensors"])
            embeds = embeds_from_bytes(data["embeds.safetensors"])
        except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt member
            raise CorruptSample(f"does not decode: {err}") from None
        return target, references, embeds


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
        """(row, target, references, embeds), or None for a corrupt sample (remembered in `bad`)."""
        key = (slot.source, slot.row)
        if key in bad:
            return None
        reader = self.readers[slot.source]
        row = reader.rows[slot.row]
        try:
            return (row, *reader.load(row))
        except CorruptSample as err:
            bad[key] = f"{reader.location}/{row['shard']}: sample {row['sample_id']}: {err}"
            return None

    def _same_shape(self, slot: Slot) -> Iterator[Slot]:
        """Every slot of the same source with the same shape as `slot`, in manifest order."""
        shapes = self.readers[slot.source].source.shapes
        for row, shape in enumerate(shapes):
            if shape == shapes[slot.row]:
                yield Slot(slot.source, row)


def collate(loaded: list[tuple], rng: random.Random, skipped: list[str], caption_dropout: float = 0.0) -> Batch:
    """Stack (row, target, references, embeds) samples.

    Each sample takes one of its captions, picked by `rng`, or with probability `caption_dropout`
    the cached embedding of the empty instruction (which still sees the sample's references).
    """
    prompts = []
    for row, _, _, embeds in loaded:
        dropped = caption_dropout > 0 and rng.random() < caption_dropout
        prompts.append(embeds["dropout"] if dropped else embeds[f"prompt.{rng.randrange(len(row['prompt_lens']))}"])
    longest = max(p.shape[0] for p in prompts)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    padded = torch.zeros(len(prompts), longest, prompts[0].shape[1], dtype=prompts[0].dtype)
    for i, p in enumerate(prompts):
        padded[i, : p.shape[0]] = p
        mask[i, : p.shape[0]] = 1
    n_refs = len(loaded[0][2])
    return Batch(
        target=torch.stack([target for _, target, _, _ in loaded]),
        references=[torch.stack([refs[j] for _, _, refs, _ in loaded]) for j in range(n_refs)],
        prompt=padded,
        prompt_mask=None if bool(mask.all()) else mask,
        sample_ids=[row["sample_id"] for row, _, _, _ in loaded],
        skipped=skipped,
    )


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
        self.caption_dropout = caption_dropout
        if caption_dropout > 0:
            for reader in readers:
                if not reader.info["fingerprint"]["settings"].get("caption_dropout"):
                    raise UserError(
                        f"{reader.location}: caption_dropout_probability is set, but this cache has no "
                        "empty-instruction embeddings; rebuild it: `prep build-cache --config ... --force`"
                    )
        self.order = TrainOrder([r.source for r in readers], batch_size, world_size, seed)
        self.position = 0  # batches handed out so far (the same on every rank)
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
        largest = 0
        for reader in self.readers:
            for row in reader.rows:
                pixels = row["height"] * row["width"] + sum(h * w for h, w in row["ref_sizes"])
                largest = max(largest, pixels // 256 + max(row["prompt_lens"]))
        return largest * batch_size

    def state_dict(self) -> dict:
        return {
            "position": self.position,
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
        if state["signature"] == self.order.signature:
            self.position = state["position"]
            return
        fraction = (state["position"] % state["per_epoch"]) / state["per_epoch"]
        self.position = state["epoch"] * self.order.per_epoch + round(fraction * self.order.per_epoch)
        print(
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
            # Its own generator: a DataLoader draws a base seed from the global RNG otherwise, which
            # would shift LoRA dropout after a resume (the global RNG state is part of a checkpoint).
            generator=torch.Generator().manual_seed(self.order.seed),
        )
        reported: set[str] = set()
        for position, batch in loader:
            assert position == self.position, "batches arrived out of order"
            self.position += 1
            for line in set(batch.skipped) - reported:
                print(f"warning: skipped unreadable sample {line}; `prep verify` checks the whole cache")
                reported.add(line)
            self.skipped += len(batch.skipped)
            yield batch
