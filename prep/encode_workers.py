"""Keep the encoders busy: CPU work in DataLoader workers, GPU work batched, writing in a background thread.

```
workers (processes)      main thread (GPU)                      writer thread
decode, place, resize -> batch by shape / sequence layout ->  serialise (safetensors, json),
VL processor             VAE + Qwen2.5-VL, copy to host        append to shards (dropout records
                                                               to their own), finish shards
```
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from prep.encode import Encoders, encode_prepared
from prep.sample_records import (
    BuiltRecords,
    Prepared,
    SamplePreparer,
    Unreadable,
    build_records,
    prepare_or_skip,
)
from prep.scan import Sample
from shared.cache.writer import ShardWriter
from shared.config import DatasetConfig


class PreparedSamples(Dataset):
    """Samples prepared for the encoders (decode, place, processor), one per item: what DataLoader workers run.
    Each item is `pack`ed for the trip to the main process (`unpack` it there), or `Unreadable`."""

    def __init__(self, samples: list[Sample], preparer: SamplePreparer, main: DatasetConfig, conds: list):
        self.samples, self.preparer, self.main, self.conds = samples, preparer, main, conds

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Packed | Unreadable:
        prepared = prepare_or_skip(self.preparer, self.samples[index], self.main, self.conds)
        return prepared if isinstance(prepared, Unreadable) else pack(prepared)


@dataclass
class Packed:
    """A prepared sample whose tensors travel in one buffer (`pack`), rebuilt as views of it by `unpack`.

    Every tensor a DataLoader worker returns reaches the main process as a file descriptor of its own,
    passed through a socket round trip, all on the main (encoding) thread: ten per edit-v2 sample of
    three references, ~1 ms each on a busy host, time the GPU waits. One buffer is one round trip.
    The Ray engine ships samples packed too, the buffer as a NumPy array (`prep.ray_engine.prepare`).
    """

    skeleton: Prepared  # the sample with each tensor replaced by its index in `layout`
    buffer: torch.Tensor  # uint8 [bytes]: every tensor's bytes, each at a 64-byte aligned offset
    layout: list[tuple[int, int, torch.dtype, tuple[int, ...]]]  # per tensor: (offset, bytes, dtype, shape)


def pack(prepared: Prepared) -> Packed:
    tensors: list[torch.Tensor] = []

    def strip(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x.contiguous())
            return _TensorSlot(len(tensors) - 1)
        if isinstance(x, list):
            return [strip(v) for v in x]
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        return x

    skeleton = replace(
        prepared,
        vae_pixels=strip(prepared.vae_pixels),
        vl_images=strip(prepared.vl_images),
        vl_texts=strip(prepared.vl_texts),
    )
    layout, end = [], 0
    for t in tensors:
        offset = -(-end // 64) * 64  # aligned for a view of any dtype
        layout.append((offset, t.nbytes, t.dtype, tuple(t.shape)))
        end = offset + t.nbytes
    buffer = torch.empty(end, dtype=torch.uint8)
    for t, (offset, size, _, _) in zip(tensors, layout, strict=True):
        buffer[offset : offset + size] = t.reshape(-1).view(torch.uint8)
    return Packed(skeleton, buffer, layout)


def unpack(packed: Packed) -> Prepared:
    def view(index: int) -> torch.Tensor:
        offset, size, dtype, shape = packed.layout[index]
        return packed.buffer[offset : offset + size].view(dtype).view(shape)

    def fill(x):
        if isinstance(x, _TensorSlot):
            return view(x.index)
        if isinstance(x, list):
            return [fill(v) for v in x]
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        return x

    skeleton = packed.skeleton
    return replace(
        skeleton,
        vae_pixels=fill(skeleton.vae_pixels),
        vl_images=fill(skeleton.vl_images),
        vl_texts=fill(skeleton.vl_texts),
    )


@dataclass(frozen=True)
class _TensorSlot:
    index: int


class BackgroundWriter:
    """Make and write records on a thread, so the GPU never waits for serialising, hashing or I/O: main records
    to `writer`, dropout records to `dropout_writer`."""

    def __init__(self, writer: ShardWriter, dropout_writer: ShardWriter | None = None, depth: int = 16):
        self.writer = writer
        self.dropout_writer = dropout_writer
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def put(self, prepared: Prepared, latents: list[torch.Tensor], embeds: list[torch.Tensor], ready=None) -> None:
        """Queue one encoded sample; `ready` (a CUDA event) marks when its host copies are complete."""
        self._put((prepared, latents, embeds, ready))

    def put_built(self, built: BuiltRecords) -> None:
        """Queue a sample's records made elsewhere (`build_records`: the Ray engine makes them on its actors)."""
        self._put(built)

    def _put(self, item) -> None:
        if self.error:
            raise self.error
        self._queue.put(item)

    def close(self) -> None:
        """Write everything queued and seal the open shard; re-raise the thread's error, if any."""
        self._queue.put(None)
        self._thread.join()
        if self.error:
            raise self.error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error:
                continue  # drain after a failure; close() re-raises it
            try:
                if not isinstance(item, BuiltRecords):
                    prepared, latents, embeds, ready = item
                    if ready is not None:
                        ready.synchronize()  # the GPU-to-host copies were queued without waiting
                    item = build_records(prepared, latents, embeds)
                if item.main is not None:
                    self.writer.write_record(*item.main)
                if item.dropout is not None:
                    if self.dropout_writer is None:
                        raise ValueError("a dropout record was encoded but encode_into was given no dropout_writer")
                    self.dropout_writer.write_record(*item.dropout)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self.error = err
        if self.error is None:
            try:  # the last shards are sealed here too, off the encoding thread, even when encoding stopped early
                self.writer.finish_shard()
                if self.dropout_writer is not None:
                    self.dropout_writer.finish_shard()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self.error = err


def to_host(x: torch.Tensor) -> torch.Tensor:
    """bf16 copy of `x` on the host; from a GPU, queued on the stream into pinned memory (not waited for)."""
    x = x.to(torch.bfloat16)
    if x.device.type != "cuda":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host


POOL_BATCHES = 8  # samples held back for full batches: 8 batches' worth (~30 MB a sample at 1024², edit-v1)


class ShapePool:
    """Prepared samples grouped by `batch_key`; hands out a batch when a group is full or the pool is."""

    def __init__(self, batch_size: int, capacity: int):
        self.batch_size, self.capacity = batch_size, max(capacity, batch_size)
        self.groups: dict[tuple, list[Prepared]] = {}
        self.size = 0

    def add(self, prepared: Prepared) -> list[Prepared] | None:
        """Add one sample; return a batch to encode now, if one is ready."""
        group = self.groups.setdefault(prepared.batch_key, [])
        group.append(prepared)
        self.size += 1
        if len(group) >= self.batch_size:
            return self._take(prepared.batch_key)
        if self.size >= self.capacity:
            return self._take(max(self.groups, key=lambda k: len(self.groups[k])))
        return None

    def drain(self) -> list[list[Prepared]]:
        """Whatever is left, one batch per group (at the end of the samples)."""
        return [self._take(key) for key in list(self.groups)]

    def _take(self, key: tuple) -> list[Prepared]:
        batch = self.groups.pop(key)
        self.size -= len(batch)
        return batch


@dataclass
class EncodeStats:
    samples: int = 0
    seconds: float = 0.0  # wall time of the whole loop
    encoder_seconds: float = 0.0  # time this thread spent in the encoders (on a GPU: launching and syncing)
    wait_seconds: float = 0.0  # time this thread waited for the DataLoader (workers too slow if large)
    unreadable: list[Unreadable] = field(default_factory=list)  # samples left out: their files could not be read
    progress: list[tuple[int, float]] = field(default_factory=list)  # (samples done, seconds since start)

    def steady_rate(self) -> float:
        """Samples/s after the first quarter (worker start-up, allocator and kernel warm-up excluded)."""
        quarter = next(((n, t) for n, t in self.progress if n >= self.samples / 4), None)
        if quarter is None or self.seconds <= quarter[1]:
            return self.samples / max(self.seconds, 1e-9)
        return (self.samples - quarter[0]) / (self.seconds - quarter[1])


def encode_into(
    writer: ShardWriter,
    samples: list[Sample],
    main: DatasetConfig,
    conds: list[DatasetConfig],
    encoders: Encoders,
    preparer: SamplePreparer,
    workers: int = 0,
    batch_size: int = 1,
    show_progress: bool = True,
    dropout_writer: ShardWriter | None = None,
) -> EncodeStats:
    """Encode `samples` into `writer`'s shards (their dropout records into `dropout_writer`'s); samples
    finished before an error or interrupt are kept."""
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked processes
    loader = DataLoader(
        PreparedSamples(samples, preparer, main, conds),
        batch_size=None,  # one Prepared at a time; batching by shape happens below
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        # Not pinned: pinning tens of MB of odd-sized tensors per sample cost 12% throughput on an H100
        # (bench/prep_throughput.py); the encoders' outputs are copied back through pinned memory instead.
        pin_memory=False,
    )
    background = BackgroundWriter(writer, dropout_writer)
    stats = EncodeStats()
    progress = tqdm(
        total=len(samples), desc=f"encoding {main.id}", unit="sample", disable=not show_progress or not samples
    )
    start = time.perf_counter()

    def encode(batch: list[Prepared]) -> None:
        t0 = time.perf_counter()
        encoded = encode_prepared(batch, encoders, max_batch=batch_size)
        # Results go to pinned host memory asynchronously: this thread goes straight on to launch the
        # next batch while the writer thread waits for the copies (an event) before serialising.
        encoded = [([to_host(x) for x in lat], [to_host(x) for x in emb]) for lat, emb in encoded]
        ready = None
        if encoders.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        stats.encoder_seconds += time.perf_counter() - t0
        for prepared, (latents, embeds) in zip(batch, encoded, strict=True):
            background.put(prepared, latents, embeds, ready)
        stats.samples += len(batch)
        stats.progress.append((stats.samples, time.perf_counter() - start))
        progress.update(len(batch))

    # Samples wait in a pool, grouped by shape, until a group fills a batch: full batches keep the
    # encoders at their best rate when buckets are interleaved. The pool is bounded (memory): when
    # it is full, its largest group goes as it is.
    pool = ShapePool(batch_size, capacity=POOL_BATCHES * batch_size)
    try:
        items = iter(loader)
        while True:
            t0 = time.perf_counter()
            packed = next(items, None)
            stats.wait_seconds += time.perf_counter() - t0
            if packed is None:
                break
            if isinstance(packed, Unreadable):
                stats.unreadable.append(packed)
                progress.update(1)
                continue
            prepared = unpack(packed)
            if batch := pool.add(prepared):
                encode(batch)
        for batch in pool.drain():
            encode(batch)
    finally:
        progress.close()
        background.close()  # every finished sample is in a sealed shard, even after an error or interrupt
    stats.seconds = time.perf_counter() - start
    return stats
