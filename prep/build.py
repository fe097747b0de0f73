"""`prep build-cache`: validate every dataset, then bring each main dataset's cache up to date.

A cache is updated in place, safely: samples whose sources (image, references, captions) are
unchanged keep their records; new and changed samples are encoded into new shards; the manifest
is replaced atomically at the end, then what it no longer references is deleted. A build killed
at any moment leaves the previous cache readable, and a rerun continues from the last complete
shard. A cache built with other settings (the fingerprint) is refused unless `--force`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from prep.distributed import Ranks, init_ranks
from prep.encode import Encoders
from prep.encode_workers import EncodeStats, encode_into
from prep.file_records import save_records
from prep.plan import Plan, plan_cache
from prep.ray_engine import encode_with_ray
from prep.sample_records import CachedEmbeds, SamplePreparer, Unreadable
from prep.validate import Report, validate
from shared.cache import (
    DROPOUT_SHARD,
    FORMAT_VERSION,
    LOCK,
    VALIDATION,
    CacheFolder,
    CacheStore,
    lock_cache,
)
from shared.cache.fingerprint import references_alone
from shared.cache.lock import CacheLock, ObjectLock
from shared.cache.writer import (
    ShardTable,
    ShardWriter,
    attach_dropout,
    commit,
)
from shared.config import Config
from shared.errors import UserError
from shared.flavours import FLAVOURS
from shared.models import load_processor, vae_scale_factor_of


@dataclass
class EncodeSettings:
    """How this build encodes: where, in what precision, how batched, on which engine."""

    device: str
    dtype: torch.dtype
    workers: int  # DataLoader workers (local engine)
    batch_size: int
    engine: str  # "local" or "ray"
    ray_address: str
    max_shard_bytes: int
    encoders: Encoders | None = None  # loaded once, kept for the next cache (local engine)
    on_stats: Callable[[EncodeStats], None] | None = None


def build_cache(
    config: Config,
    device: str = "cpu",
    dtype: str = "auto",
    force: bool = False,
    max_shard_bytes: int = 1_000_000_000,
    workers: int | None = None,
    batch_size: int | None = None,
    encoders: Encoders | None = None,
    on_stats: Callable[[EncodeStats], None] | None = None,
    engine: str = "local",
    ray_address: str = "",
) -> list[Path | str]:
    """Validate, then bring every main dataset's cache up to date; return the caches (a local dir's Path, or
    the URL of one in an object store: `cache_dir` `s3://bucket/cache`).

    Only new or changed samples are encoded (and, after an interrupted build, only those no
    finished shard holds). `dtype` is the encoders' precision: "auto" is bf16 on a GPU (as
    inference runs) and fp32 on CPU (bf16 convolutions are ~5x slower there); the cache is bf16.
    Launched on several processes (torchrun / accelerate launch), each rank encodes a disjoint
    share into its own shards and rank 0 writes the manifest: the cache must be visible to all.
    `encoders` (already loaded) and `on_stats` (called with each cache's timing) serve bench/. `engine`
    "ray" encodes on Ray Data instead (prep/ray_engine.py; `ray_address`: a cluster to join), into the same
    shards and manifest.
    """
    if engine not in ("local", "ray"):
        raise UserError(f"--engine {engine!r}: use local or ray")
    ranks, device = init_ranks(device)
    if engine == "ray" and ranks.world > 1:
        raise UserError("--engine ray spreads the work itself: run it as one process, not under torchrun")
    on_gpu = device.startswith("cuda")
    settings = EncodeSettings(
        device=device,
        dtype=encoder_dtype(dtype, device),
        # On a GPU, workers decode while it encodes; on CPU the encoders want every core themselves.
        workers=(min(8, os.cpu_count() or 1) if on_gpu else 0) if workers is None else workers,
        batch_size=(4 if on_gpu else 1) if batch_size is None else batch_size,
        engine=engine,
        ray_address=ray_address,
        max_shard_bytes=max_shard_bytes,
        encoders=encoders,
        on_stats=on_stats,
    )
    locks = ExitStack()  # rank 0 holds every cache's build lock until its manifest is written
    held: dict[str, CacheLock | ObjectLock] = {}  # cache location -> its lock (rank 0)
    report, plans = lock_and_plan(config, ranks, locks, held, settings.dtype, force)
    left_out: list[Unreadable] = []  # samples whose files could not be read when they came to be encoded
    with locks:
        for plan in plans:
            if plan.up_to_date:
                if ranks.is_main:
                    save_validation(plan, config, report)
                    print(f"cache {plan.folder}: up to date ({plan.reuse.num_rows} samples)")
                continue
            start = time.perf_counter()
            writers = encode_plan(plan, config, ranks, settings)
            left_out += [u for part in ranks.gather(writers.unreadable) for u in part]
            commit_plan(plan, config, report, ranks, writers, held, start)
            ranks.barrier()
    if left_out:
        raise UserError(unreadable_message(left_out))
    return [plan.folder.local or plan.folder.location for plan in plans]


def lock_and_plan(
    config: Config, ranks: Ranks, locks: ExitStack, held: dict, dtype: torch.dtype, force: bool
) -> tuple[Report | None, list[Plan]]:
    """On rank 0: validate, take every cache's build lock (into `locks`, by location into `held`) and plan
    each cache; every rank gets the plans, or the UserError that stopped them (so none waits for work that
    never comes). Returns rank 0's validation report (None elsewhere) and the plans."""
    outcome, report = None, None
    if ranks.is_main:
        try:
            report = validate_for_build(config)  # before the locks: data that is not trainable writes nothing
            for main in config.main_datasets():
                folder = CacheFolder(config.cache_location_for(main))
                lock = held[folder.location] = locks.enter_context(lock_cache(folder, LOCK))
                if lock.stale:
                    print(f"note: the build by pid {lock.stale.get('pid')} ({lock.path}) was stopped; continuing it")
            outcome = ("plans", plan_build(config, report, dtype, force))
        except UserError as err:
            locks.close()
            outcome = ("error", str(err))
        except BaseException:
            locks.close()  # an interrupt or an unexpected error while planning: release what was taken
            raise
    kind, value = ranks.broadcast(outcome)
    if kind == "error":
        raise UserError(value)
    return report, value


@dataclass
class PlanWriters:
    """What one process wrote for a plan: its shard writers (their rows and sealed shards) and the samples
    it could not read."""

    main: ShardWriter
    dropout: ShardWriter
    unreadable: list[Unreadable]


def encode_plan(plan: Plan, config: Config, ranks: Ranks, settings: EncodeSettings) -> PlanWriters:
    """Encode this process's share of the plan's samples into new shards (main and dropout records)."""
    mine = ranks.share(plan.encode + plan.add_dropout)
    fingerprint_hash = plan.fingerprint["sha256"]
    writer = ShardWriter(plan.folder, fingerprint_hash, settings.max_shard_bytes, ranks.shard_prefix)
    dropout_writer = ShardWriter(
        plan.folder, fingerprint_hash, settings.max_shard_bytes, ranks.shard_prefix, dropout=True
    )
    if not mine:
        return PlanWriters(writer, dropout_writer, [])
    flavour = FLAVOURS[config.train.model_flavour]
    model = config.train.pretrained_model_name_or_path
    if settings.engine == "local" and settings.encoders is None:
        print(f"loading encoders from {model} on {settings.device} ({settings.dtype})")
        settings.encoders = Encoders(model, flavour, settings.device, settings.dtype)
    # Ray's actors load the encoders; the preparer (shipped to its CPU tasks) needs only the processor.
    processor, scale = (
        (settings.encoders.processor, settings.encoders.scale)
        if settings.engine == "local"
        else (load_processor(model), vae_scale_factor_of(model))
    )
    preparer = SamplePreparer(
        flavour,
        processor,
        scale,
        config.train.match_target_res,
        config.train.crop_seed,
        config.train.preview_settings,
        references_alone(config, plan.main),
        dropout=plan.dropout,
        dropout_only=CachedEmbeds(CacheStore(plan.folder.location), plan.embeds_spans),
    )
    conds = config.conditioning_for(plan.main)
    if settings.engine == "ray":
        stats = encode_with_ray(
            writer,
            mine,
            plan.main,
            conds,
            preparer,
            model,
            flavour,
            settings.device,
            settings.dtype,
            settings.batch_size,
            dropout_writer,
            address=settings.ray_address,
        )
    else:
        stats = encode_into(
            writer,
            mine,
            plan.main,
            conds,
            settings.encoders,
            preparer,
            workers=settings.workers,
            batch_size=settings.batch_size,
            show_progress=ranks.is_main,
            dropout_writer=dropout_writer,
        )
    if settings.on_stats:
        settings.on_stats(stats)
    print(
        f"rank {ranks.rank}: {stats.samples} samples in {stats.seconds:.1f} s "
        f"({stats.samples / max(stats.seconds, 1e-9):.2f} samples/s, steady {stats.steady_rate():.2f})"
    )
    return PlanWriters(writer, dropout_writer, stats.unreadable)


def commit_plan(
    plan: Plan, config: Config, report: Report | None, ranks: Ranks, writers: PlanWriters, held: dict, start: float
) -> None:
    """Gather every process's new rows and shards; on rank 0, write the manifest and cache.json over the
    reused rows (still holding the cache's lock) and say what the cache now holds."""
    encoded = [row for rows in ranks.gather(writers.main.rows) for row in rows]
    dropouts = [row for rows in ranks.gather(writers.dropout.rows) for row in rows]
    sealed = ranks.gather({**writers.main.shards, **writers.dropout.shards})
    shards = {**plan.shards, **{name: s for table in sealed for name, s in table.items()}}
    if not ranks.is_main:
        return
    rows = sorted(plan.reuse.to_pylist() + encoded, key=lambda r: (r["relpath"], r["sample_id"]))
    attach_dropout(rows, dropouts)
    info = cache_info(plan, rows, FLAVOURS[config.train.model_flavour], shards)
    held[plan.folder.location].check()  # still this cache's only writer
    commit(plan.folder, rows, shards, info)
    save_validation(plan, config, report)
    n = max(len(rows), 1)
    print(
        f"cache {plan.folder}: {len(rows)} samples ({len(encoded)} encoded by {ranks.world} "
        f"process(es), {plan.reuse.num_rows} reused ({len(plan.add_dropout)} given dropout embeddings), "
        f"{plan.removed} removed), "
        f"{info['counts']['shard_bytes'] / n / 1024:.1f} KiB/sample, {time.perf_counter() - start:.1f} s"
    )


def unreadable_message(left_out: list[Unreadable]) -> str:
    """What to tell a user whose samples could not be read at encoding time (all else is cached)."""
    shown = "\n".join(f"  {u.sample.relpath}: {u.reason}" for u in left_out[:20])
    more = f"\n  ... and {len(left_out) - 20} more" if len(left_out) > 20 else ""
    return (
        f"{len(left_out)} sample(s) could not be read when they came to be encoded (their files changed or went "
        f"away after validation); they are not in the cache, every other sample is:\n{shown}{more}\n"
        "Fix or remove these files and run `prep build-cache` again: only they are encoded."
    )


def validate_for_build(config: Config) -> Report:
    """Validate every dataset; stop with the report unless the data is trainable."""
    report = validate(config)
    if not report.trainable:
        raise UserError(f"{report.render()}\nNothing was encoded.")
    print(
        f"validated: {sum(len(v) for v in report.samples.values())} samples, {len(report.warnings)} warning(s), "
        f"{report.decoded} of {len(report.files)} images decoded (the rest unchanged since the last build)"
    )
    return report


def plan_build(config: Config, report: Report, dtype: torch.dtype, force: bool) -> list[Plan]:
    """Plan each cache: what to reuse, what to encode (the caches are locked)."""
    plans = [plan_cache(config, m, report.samples[m.id], report.files, dtype, force) for m in config.main_datasets()]
    for plan in plans:
        added = f", {len(plan.add_dropout)} to give dropout embeddings (caption dropout)" if plan.add_dropout else ""
        print(
            f"cache {plan.folder}: {plan.reuse.num_rows} up to date{added}, {len(plan.encode)} to encode, "
            f"{plan.removed} removed"
        )
    return plans


def save_validation(plan: Plan, config: Config, report: Report) -> None:
    """Keep what validation learned about this cache's image files, for the next build (if it changed)."""
    if report.records_current and plan.folder.exists(VALIDATION):
        return
    roots = tuple(os.path.join(d.instance_data_dir, "") for d in [plan.main, *config.conditioning_for(plan.main)])
    save_records(plan.folder, {p: r for p, r in report.files.items() if str(p).startswith(roots)})


def cache_info(plan: Plan, rows: list[dict], flavour, shard_table: ShardTable) -> dict:
    """The contents of cache.json for a cache holding `rows`."""
    shards = {r["shard"] for r in rows} | {r[DROPOUT_SHARD] for r in rows if r.get(DROPOUT_SHARD)}
    return {
        "format_version": FORMAT_VERSION,
        "flavour": flavour.name,
        "dataset_id": plan.main.id,
        "fingerprint": plan.fingerprint,
        "counts": {
            "samples": len(rows),
            "train": sum(r["split"] == "train" for r in rows),
            "eval": sum(r["split"] == "eval" for r in rows),
            "dropout": sum(r.get(DROPOUT_SHARD) is not None for r in rows),  # train samples with a dropout embedding
            "shards": len(shards),
            "shard_bytes": sum(shard_table[s]["bytes"] for s in shards),
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def encoder_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    if name not in dtypes:
        raise UserError(f"--dtype {name!r}: use auto, bf16, fp16 or fp32")
    return dtypes[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
