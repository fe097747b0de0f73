"""`prep build-cache --engine ray`: the same encoding on Ray Data, from one machine to a cluster.

```
Ray Data (cluster)                                                   driver (this process)
samples -> prepare on CPU tasks -> encode on a pool of actors,   -> the same writer thread: append
           (decode, place, VL       then make the records            the records to shards, seal
            processor)              (serialise, tar-frame, hash)     them; the manifest at the end
```

Only the encoding and the making of records move: validation, the plan (what to reuse, what to encode),
the shard writer and the manifest are the local engine's own code (prep/build.py, shared/cache/writer.py),
so `train run` cannot tell which engine built a cache: the same sample ids, members, tensors (bitwise on
CPU) and manifest rows. (On CPU, batch 1, the shards are the same bytes too; with batches of several shapes
the local engine writes samples in its pool's order and Ray in the samples' order, so records sit
elsewhere.) Each actor call takes the local engine's pool of samples at once (`POOL_BATCHES` batches),
which `encode_prepared` batches by shape; results stream back in the samples' order (`preserve_order`).
Ray retries the work of an actor that dies (a lost node, a kill) on a new one; an interrupted build is
resumed by the same command, from its sealed shards, like a local one. Ray is an optional extra:
`pip install 'qwen-edit-trainer[ray]'`. `--ray-address` (or `RAY_ADDRESS`) joins a running cluster (one that
cannot be reached is an error at once); without either a local Ray is started for the build.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from prep import sample_records as records
from prep.encode import Encoders, encode_prepared
from prep.encode_workers import POOL_BATCHES, BackgroundWriter, EncodeStats, Packed, pack, to_host, unpack
from prep.scan import Sample
from shared.cache.writer import ShardWriter, TarRecord
from shared.config import DatasetConfig
from shared.errors import UserError
from shared.flavours import Flavour

# Calls in an actor at once: one encodes; the others take their batches or make their records. With two,
# the one H200 of a build waited for batches (93% busy, 11.8 samples/s); with four it never did (100%, 13.7).
CALLS_PER_ACTOR = 4


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the `data` extra of ray
    except ImportError:
        raise UserError(
            "--engine ray needs Ray Data: pip install 'qwen-edit-trainer[ray]' (or pip install 'ray[data]'); "
            "without it, leave --engine at local"
        ) from None
    return ray


# How long a cluster's head may take to accept a connection. Ray itself retries an unreachable head for
# minutes, printing only its own warnings.
CONNECT_SECONDS = 10.0


def join_or_start(ray, address: str) -> None:
    """Join the Ray cluster at `address` (its head's `host:port`, `ray://host:port` through Ray Client, or
    `auto`: the one `RAY_ADDRESS` names, else the one running on this machine), or start a local Ray when
    `address` is empty. A head that does not answer is a `UserError` within seconds; addresses of other
    schemes (a Ray client plugin's) go to Ray as they are."""
    probed = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address  # Ray reads it for auto too
    if probed and probed not in ("auto", "local"):
        _check_reachable(probed)
    try:
        ray.init(address=address or None, log_to_driver=False)
    except ConnectionError as err:
        if not address:  # starting a Ray on this machine failed
            raise
        raise UserError(f"no Ray cluster to join at {address!r}: {err}") from None


def _check_reachable(address: str) -> None:
    """A `UserError` unless `address` (`host:port` or `ray://host:port`) accepts a TCP connection within
    `CONNECT_SECONDS`; other schemes are not checked."""
    where = urllib.parse.urlsplit(address if "://" in address else f"//{address}")
    if where.scheme in ("http", "https"):  # the dashboard's address, as `ray job submit` takes it
        raise UserError(
            f"the Ray address {address} is a dashboard's: a build joins the cluster itself, at its head's "
            "host:6379 (or ray://host:10001 through Ray Client); fix --ray-address, ray_address in config.json "
            "or RAY_ADDRESS"
        )
    if where.scheme not in ("", "ray"):
        return
    try:
        host, port = where.hostname, where.port
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or port is None:
        raise UserError(
            f"the Ray address {address!r} is not host:port (or ray://host:port, or auto): check --ray-address, "
            "ray_address in config.json or RAY_ADDRESS"
        )
    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        raise UserError(
            f"cannot reach the Ray cluster at {address} ({host}:{port}: {err}): start its head there "
            "(ray start --head), or fix --ray-address, ray_address in config.json or RAY_ADDRESS; leave them "
            "empty to start a Ray on this machine"
        ) from None


def prepare(row: dict, preparer: records.SamplePreparer, main: DatasetConfig, conds: list[DatasetConfig]) -> dict:
    """A CPU task: one sample decoded, placed and processed, as a DataLoader worker does it locally, and
    packed for the trip to its actor (or `Unreadable`: the others go on)."""
    prepared = records.prepare_or_skip(preparer, row["sample"], main, conds)
    if isinstance(prepared, records.Unreadable):
        return {"prepared": prepared}
    # Its tensors in one NumPy buffer: unpickled on the actor in ~0.5 ms for 10 MB, against ~5.7 ms for the
    # same bytes as torch tensors (torch's own unpickling). That time holds the GIL the encoding thread
    # needs to launch its kernels (measured on CPU; on an H200 the GPU idled whole seconds per call).
    packed = pack(prepared)
    return {"prepared": replace(packed, buffer=packed.buffer.numpy())}


def unpacked(packed: Packed) -> records.Prepared:
    """`prepare`'s NumPy-packed sample as the encoders take it: its tensors are views of the buffer."""
    with warnings.catch_warnings():  # the buffer is read-only (unpickled in place); the encoders only read it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return unpack(replace(packed, buffer=torch.from_numpy(packed.buffer)))


class EncodeActor:
    """One actor of the encoding pool: the model's encoders, loaded once, encode batches of prepared samples."""

    def __init__(self, model: str, flavour: Flavour, device: str, dtype: torch.dtype, batch_size: int, threads: int):
        if device.startswith("cuda"):
            device = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        else:  # Ray starts workers with one thread; the local engine's thread count gives its very sums
            torch.set_num_threads(threads)
        self.encoders = Encoders(model, flavour, device, dtype)
        self.batch_size = batch_size
        self.encoding = threading.Lock()  # one call on the encoders at a time (memory); records made beside it
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per input row, in order: its `BuiltRecords` (or the `Unreadable` it came as), and the call's `CallTimes`."""
        items = list(batch["prepared"])
        prepared = [unpacked(p) for p in items if not isinstance(p, records.Unreadable)]
        with self.encoding:
            started = time.time()
            encoded = encode_prepared(prepared, self.encoders, max_batch=self.batch_size)
            host = [([to_host(x) for x in lat], [to_host(x) for x in emb]) for lat, emb in encoded]
            if self.encoders.device.type == "cuda":
                torch.cuda.synchronize()  # to_host queues its copies; they must be done before they are read
            del encoded  # the device's outputs go now, not while the other call encodes
            encoded_at = time.time()
        # Serialised, tar-framed and hashed here, while the other call encodes: the driver only appends them.
        built = (_joined(records.build_records(p, lat, emb)) for p, (lat, emb) in zip(prepared, host, strict=True))
        column = _objects([item if isinstance(item, records.Unreadable) else next(built) for item in items])
        times = CallTimes(self.name, started, encoded_at)
        return {"built": column, "times": _objects([times] * len(items))}


@dataclass(frozen=True)
class CallTimes:
    """When one actor call held the encoders (wall clock of the actor's host, s)."""

    actor: str  # host:pid
    started: float  # encoders taken (the other call's encoding done)
    encoded: float  # encoders released, outputs on the host


def encoder_report(calls: set[CallTimes]) -> str:
    """How busy the encoders were between each actor's first and last encoding: below ~95%, the actors
    waited for Ray Data to bring them batches (the CPU tasks, or the hand-over, too slow)."""
    actors: dict[str, list[CallTimes]] = {}
    for call in calls:
        actors.setdefault(call.actor, []).append(call)
    busy = sum(c.encoded - c.started for group in actors.values() for c in group)
    window = sum(max(c.encoded for c in g) - min(c.started for c in g) for g in actors.values())
    between = []  # per call after an actor's first: how long its encoders idled before it
    for group in actors.values():
        ordered = sorted(group, key=lambda c: c.started)
        between += [max(0.0, b.started - a.encoded) for a, b in zip(ordered, ordered[1:], strict=False)]
    late = sum(1 for gap in between if gap > 0.05)
    return (
        f"ray: {len(actors)} encoding actor(s) busy {busy / max(window, 1e-9):.0%} of the time "
        f"({busy:.1f} s of {window:.1f} s; {len(calls)} calls; {late} waited for their batch, "
        f"{sum(between):.1f} s in all)"
    )


def _joined(built: records.BuiltRecords) -> records.BuiltRecords:
    """Each record of `built` in one piece, to ship to the driver: a NumPy array, which Ray Data moves ~10x
    faster than the same bytes as a `bytes` object (measured on CPU: 7.1 against 0.7 records/s of 10 MB)."""

    def one_piece(record: TarRecord) -> TarRecord:
        return replace(record, chunks=[np.frombuffer(b"".join(record.chunks), dtype=np.uint8)])

    return records.BuiltRecords(
        None if built.main is None else (one_piece(built.main[0]), built.main[1]),
        None if built.dropout is None else (one_piece(built.dropout[0]), built.dropout[1]),
    )


def _objects(items: list) -> np.ndarray:
    """A column of Python objects (lists of tensors of any shapes), kept as they are by Ray Data."""
    column = np.empty(len(items), dtype=object)
    column[:] = items
    return column


def encode_with_ray(
    writer: ShardWriter,
    samples: list[Sample],
    main: DatasetConfig,
    conds: list[DatasetConfig],
    preparer: records.SamplePreparer,
    model: str,
    flavour: Flavour,
    device: str,
    dtype: torch.dtype,
    batch_size: int,
    dropout_writer: ShardWriter,
    address: str = "",
    actors: int | None = None,
) -> EncodeStats:
    """Encode `samples` on Ray into `writer`'s shards (dropout records into `dropout_writer`'s), as
    `prep.encode_workers.encode_into` does locally. `actors`: encoders in the pool (default: one per GPU of the
    cluster; one on CPU)."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        join_or_start(ray, address or os.environ.get("RAY_ADDRESS", ""))
    on_gpu = device.startswith("cuda")
    if actors is None:
        actors = max(1, int(ray.cluster_resources().get("GPU", 0))) if on_gpu else 1
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # records reach the writer in the samples' order
    context.enable_progress_bars = False
    stats = EncodeStats()
    calls: set[CallTimes] = set()
    start = time.perf_counter()
    background = BackgroundWriter(writer, dropout_writer)
    try:
        rows = ray.data.from_items([{"sample": s} for s in samples], override_num_blocks=max(1, len(samples)))
        rows = rows.map(functools.partial(prepare, preparer=preparer, main=main, conds=conds))
        rows = rows.map_batches(
            EncodeActor,
            fn_constructor_args=(model, flavour, device, dtype, batch_size, torch.get_num_threads()),
            # The local engine's pool of POOL_BATCHES batches, as one call: `encode_prepared` groups the
            # call's samples by shape into batches of `batch_size`. Consecutive samples are of mixed
            # buckets, so calls of `batch_size` samples encoded ~1.3 samples a batch on 3 buckets.
            batch_size=batch_size * POOL_BATCHES,
            batch_format="numpy",
            # CALLS_PER_ACTOR calls per actor at once: while one batch encodes, Ray Data unpickles the
            # next batches' inputs (~10 MB a sample at 1 MP, edit-v1) and finished calls make their
            # records; one at a time the encoder waited ~0.25 s a sample for Ray Data alone (measured on
            # CPU). The encoding itself stays one batch at a time (the actor's lock).
            compute=ray.data.ActorPoolStrategy(
                size=actors, max_concurrent_calls_per_actor=CALLS_PER_ACTOR, enable_true_multi_threading=True
            ),
            num_gpus=1 if on_gpu else 0,
            # an actor that dies (a lost node, a kill) is replaced and its batch is encoded again
            max_restarts=-1,
            max_task_retries=-1,
        )
        for row in rows.iter_rows():
            calls.add(row["times"])
            if isinstance(row["built"], records.Unreadable):
                stats.unreadable.append(row["built"])
                continue
            background.put_built(row["built"])
            stats.samples += 1
            stats.progress.append((stats.samples, time.perf_counter() - start))
    finally:
        background.close()  # every record received is in a sealed shard, even after an error or interrupt
        if started:
            ray.shutdown()
    stats.seconds = time.perf_counter() - start
    if calls:
        print(encoder_report(calls))
    return stats
