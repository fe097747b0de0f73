"""`prep build-cache`: validate every dataset, then bring each main dataset's cache up to date.

A cache is updated in place, safely: samples whose sources (image, references, captions) are
unchanged keep their records; new and changed samples are encoded into new shards; the manifest
is replaced atomically at the end, then what it no longer references is deleted. A build killed
at any moment leaves the previous cache readable, and a rerun continues from the last complete
shard. A cache built with other settings (the fingerprint) is refused unless `--force`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from prep.distributed import init_ranks
from prep.encode import Encoders
from prep.file_records import FileRecord, save_records
from prep.pipeline import EncodeStats, encode_into
from prep.record import CachedEmbeds, SamplePreparer, source_sha256
from prep.scan import Sample
from prep.validate import Report, validate
from shared.cache import (
    CACHE_JSON,
    DAMAGED,
    DROPOUT_COLUMNS,
    DROPOUT_SHARD,
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    MANIFEST_SCHEMA,
    SHARDS_DIR,
    VALIDATION,
    CacheLock,
    CacheStore,
    needs_dropout,
)
from shared.cache.fingerprint import changed_settings, fingerprint, references_alone
from shared.cache.writer import (
    ShardTable,
    ShardWriter,
    attach_dropout,
    commit,
    manifest_fingerprint,
    read_existing_rows,
)
from shared.config import Config, DatasetConfig
from shared.errors import UserError
from shared.flavours import FLAVOURS


@dataclass
class Plan:
    """What one cache needs: rows to keep as they are, samples to encode, and why."""

    main: DatasetConfig
    cache_dir: Path
    fingerprint: dict
    reuse: pa.Table = field(default_factory=MANIFEST_SCHEMA.empty_table)  # manifest rows kept as they are
    shards: ShardTable = field(default_factory=dict)  # size and sha256 of the shards the reused rows are in
    encode: list[Sample] = field(default_factory=list)
    removed: int = 0  # rows of samples no longer in the dataset
    manifest_current: bool = False  # the manifest holds exactly the reused rows, under this fingerprint
    dropout: bool = False  # training reads dropout records (caption dropout is on): new train samples get one
    add_dropout: list[Sample] = field(default_factory=list)  # reused train samples that lack their dropout record
    embeds_spans: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # theirs: (shard, offset, size)

    @property
    def up_to_date(self) -> bool:
        """Nothing to encode, add or remove, and the manifest already says exactly this."""
        return not self.encode and not self.add_dropout and not self.removed and self.manifest_current


def plan_cache(
    config: Config, main: DatasetConfig, samples: list[Sample], files: dict[Path, FileRecord], dtype, force: bool
) -> Plan:
    """Compare the dataset with what the cache holds; refuse a cache built with other settings unless `force`.

    `files` holds each image's content sha256 from validation, so nothing is read again here.
    """
    cache_dir = config.cache_dir_for(main)
    plan = Plan(main, cache_dir, fingerprint(config, main, dtype))
    built = None if force else read_manifest_ids(cache_dir)  # (fingerprint, sample ids) of the manifest
    if built is not None and not CacheStore(cache_dir).manifest_as_written(_cache_info(cache_dir) or {}):
        print(f"note: {cache_dir / MANIFEST} differs from the one the build wrote; every sample is encoded again")
        built, force = None, True
    if built is not None and built[0] != plan.fingerprint["sha256"]:
        raise UserError(_fingerprint_message(cache_dir, plan.fingerprint["settings"]))
    existing, plan.shards = (None, {}) if force else read_existing_rows(cache_dir, plan.fingerprint["sha256"])
    position, source = {}, []
    if existing is not None:  # sample id -> its (last) row, compared by columns: no Python object per row
        damaged = damaged_shards(cache_dir, plan.shards) | verify_found_damaged(cache_dir)
        kept_records = existing
        existing = without_dropout_records_in(existing, damaged)
        dropped_records = existing is not kept_records
        shards = existing.column("shard").to_pylist()
        position = {i: n for n, i in enumerate(existing.column("sample_id").to_pylist()) if shards[n] not in damaged}
        source = existing.column("source_sha256").to_pylist()
    dropped_records = False
    current, reuse = set(), []
    for sample in samples:
        current.add(sample.sample_id)
        n = position.get(sample.sample_id)
        digests = [files[p].sha256 for p in [sample.image, *sample.references]]
        if n is not None and source[n] == source_sha256(sample, digests, config.train.preview_settings):
            reuse.append(n)
        else:
            plan.encode.append(sample)
    if reuse:
        plan.reuse = existing.take(pa.array(reuse, type=pa.int64()))
    plan.dropout = needs_dropout(config.train.caption_dropout_probability)
    if plan.dropout:
        plan_added_dropout(plan, {s.sample_id: s for s in samples})
    if built is not None:
        plan.removed = len(built[1] - current)
        kept = set(plan.reuse.column("sample_id").to_pylist())
        # Index files are deleted by every commit: any left over hold sealed work the manifest does not list yet.
        uncommitted = any((cache_dir / SHARDS_DIR).glob("*.index.parquet"))
        plan.manifest_current = (
            built[1] == kept
            and not uncommitted
            and not dropped_records
            and _same(_cache_info_fingerprint(cache_dir), plan.fingerprint)
        )
    return plan


def without_dropout_records_in(table: pa.Table, damaged: set[str]) -> pa.Table:
    """`table` with the dropout columns emptied where the dropout record lies in a `damaged` shard (the plan
    then adds those records again)."""
    hit = pc.fill_null(pc.is_in(table.column(DROPOUT_SHARD), pa.array(sorted(damaged), pa.string())), False)
    if not pc.any(hit).as_py():
        return table
    for column in DROPOUT_COLUMNS:
        kept = pc.if_else(hit, pa.nulls(table.num_rows, table.schema.field(column).type), table.column(column))
        table = table.set_column(table.schema.get_field_index(column), column, kept)
    return table


def plan_added_dropout(plan: Plan, samples: dict[str, Sample]) -> None:
    """The reused train samples without a dropout record: only that record is encoded for them (their
    images' VL pass, no VAE), into new shards; their main records stay as they are."""
    reuse = plan.reuse
    lacking = reuse.filter(pc.and_(pc.equal(reuse.column("split"), "train"), pc.is_null(reuse.column(DROPOUT_SHARD))))
    for row in lacking.select(["sample_id", "shard", "embeds_offset", "embeds_size"]).to_pylist():
        plan.add_dropout.append(samples[row["sample_id"]])
        plan.embeds_spans[row["sample_id"]] = (row["shard"], row["embeds_offset"], row["embeds_size"])


def read_manifest_ids(cache_dir: Path) -> tuple[str, set[str]] | None:
    """(fingerprint, sample ids) of the cache's manifest; None when there is none or it cannot be read
    (cut short or damaged: then every sample no sealed shard index holds is encoded again)."""
    manifest = cache_dir / MANIFEST
    if not manifest.is_file():
        return None
    try:
        ids = set(pq.read_table(manifest, columns=["sample_id"]).column("sample_id").to_pylist())
        return manifest_fingerprint(manifest), ids
    except (OSError, pa.ArrowException) as err:
        print(f"note: {manifest} cannot be read ({err}); its samples are encoded again")
        return None


def _cache_info(cache_dir: Path) -> dict | None:
    try:
        info = json.loads((cache_dir / CACHE_JSON).read_text())
    except (OSError, ValueError):
        return None  # missing, empty or damaged: the commit writes it again
    return info if isinstance(info, dict) else None


def _cache_info_fingerprint(cache_dir: Path) -> dict | None:
    return (_cache_info(cache_dir) or {}).get("fingerprint")


def _same(recorded: dict | None, current: dict) -> bool:
    """cache.json records `current` (hash and settings: the per-sample preview settings are not hashed)."""
    return json.dumps(recorded, sort_keys=True, default=str) == json.dumps(current, sort_keys=True, default=str)


def verify_found_damaged(cache_dir: Path) -> set[str]:
    """The shards `prep verify` found damaged (it leaves their names in damaged.json): encoded again."""
    try:
        shards = set(json.loads((cache_dir / DAMAGED).read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    for shard in sorted(shards):
        print(f"note: prep verify found {cache_dir / shard} damaged; its samples are encoded again")
    return shards


def damaged_shards(cache_dir: Path, shards: ShardTable) -> set[str]:
    """Shards that are missing or not the size they were sealed at (one `stat` each): their samples are
    encoded again rather than reported up to date. (`prep verify` checks every byte.)"""
    damaged = set()
    for name, recorded in shards.items():
        path = cache_dir / name
        if not path.is_file() or path.stat().st_size != recorded["bytes"]:
            damaged.add(name)
            print(f"note: {path} is missing or damaged; its samples are encoded again")
    return damaged


def _fingerprint_message(cache_dir: Path, settings: dict) -> str:
    try:
        changed = changed_settings(
            json.loads((cache_dir / CACHE_JSON).read_text())["fingerprint"]["settings"], settings
        )
    except (OSError, ValueError, KeyError):
        changed = ["(cache.json unreadable)"]
    return (
        f"{cache_dir}: this cache was built with other settings (changed: {', '.join(changed)}); its samples "
        "cannot be mixed with new ones. Rerun with --force to rebuild it, or point cache_dir elsewhere."
    )


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
) -> list[Path]:
    """Validate, then bring every main dataset's cache up to date; return the cache dirs.

    Only new or changed samples are encoded (and, after an interrupted build, only those no
    finished shard holds). `dtype` is the encoders' precision: "auto" is bf16 on a GPU (as
    inference runs) and fp32 on CPU (bf16 convolutions are ~5x slower there); the cache is bf16.
    Launched on several processes (torchrun / accelerate launch), each rank encodes a disjoint
    share into its own shards and rank 0 writes the manifest: the cache dir must be visible to all.
    `encoders` (already loaded) and `on_stats` (called with each cache's timing) serve bench/.
    """
    ranks, device = init_ranks(device)
    torch_dtype = encoder_dtype(dtype, device)
    on_gpu = device.startswith("cuda")
    # On a GPU, workers decode while it encodes; on CPU the encoders want every core themselves.
    workers = (min(8, os.cpu_count() or 1) if on_gpu else 0) if workers is None else workers
    batch_size = (4 if on_gpu else 1) if batch_size is None else batch_size
    outcome, report = None, None
    locks = ExitStack()  # rank 0 holds every cache's build lock until its manifest is written
    if ranks.is_main:
        try:
            report = validate_for_build(config)  # before the locks: data that is not trainable writes nothing
            for main in config.main_datasets():
                lock = locks.enter_context(CacheLock(config.cache_dir_for(main), LOCK))
                if lock.stale:
                    print(f"note: the build by pid {lock.stale.get('pid')} ({lock.path}) was stopped; continuing it")
            plans = plan_build(config, report, torch_dtype, force)
            outcome = ("plans", plans)
        except UserError as err:
            locks.close()
            outcome = ("error", str(err))  # sent to every rank, so none waits for work that never comes
    kind, value = ranks.broadcast(outcome)
    if kind == "error":
        raise UserError(value)
    plans: list[Plan] = value

    flavour = FLAVOURS[config.train.model_flavour]
    with locks:
        for plan in plans:
            if plan.up_to_date:
                if ranks.is_main:
                    save_validation(plan, config, report)
                    print(f"cache {plan.cache_dir}: up to date ({plan.reuse.num_rows} samples)")
                continue
            start = time.perf_counter()
            mine = ranks.share(plan.encode + plan.add_dropout)
            fingerprint_hash = plan.fingerprint["sha256"]
            writer = ShardWriter(plan.cache_dir, fingerprint_hash, max_shard_bytes, ranks.shard_prefix)
            dropout_writer = ShardWriter(
                plan.cache_dir, fingerprint_hash, max_shard_bytes, ranks.shard_prefix, dropout=True
            )
            if mine and encoders is None:
                print(f"loading encoders from {config.train.pretrained_model_name_or_path} on {device} ({torch_dtype})")
                encoders = Encoders(config.train.pretrained_model_name_or_path, flavour, device, torch_dtype)
            if mine:
                preparer = SamplePreparer(
                    flavour,
                    encoders.processor,
                    encoders.scale,
                    config.train.match_target_res,
                    config.train.crop_seed,
                    config.train.preview_settings,
                    references_alone(config, plan.main),
                    dropout=plan.dropout,
                    dropout_only=CachedEmbeds(CacheStore(plan.cache_dir), plan.embeds_spans),
                )
                stats = encode_into(
                    writer,
                    mine,
                    plan.main,
                    config.conditioning_for(plan.main),
                    encoders,
                    preparer,
                    workers=workers,
                    batch_size=batch_size,
                    show_progress=ranks.is_main,
                    dropout_writer=dropout_writer,
                )
                if on_stats:
                    on_stats(stats)
                print(
                    f"rank {ranks.rank}: {stats.samples} samples in {stats.seconds:.1f} s "
                    f"({stats.samples / max(stats.seconds, 1e-9):.2f} samples/s)"
                )
            encoded = [row for rows in ranks.gather(writer.rows) for row in rows]
            dropouts = [row for rows in ranks.gather(dropout_writer.rows) for row in rows]
            sealed = ranks.gather({**writer.shards, **dropout_writer.shards})
            shards = {name: s for table in sealed for name, s in table.items()}
            if ranks.is_main:
                rows = sorted(plan.reuse.to_pylist() + encoded, key=lambda r: (r["relpath"], r["sample_id"]))
                attach_dropout(rows, dropouts)
                info = cache_info(plan, rows, flavour, {**plan.shards, **shards})
                commit(plan.cache_dir, rows, {**plan.shards, **shards}, info)
                save_validation(plan, config, report)
                n = max(len(rows), 1)
                print(
                    f"cache {plan.cache_dir}: {len(rows)} samples ({len(encoded)} encoded by {ranks.world} "
                    f"process(es), {plan.reuse.num_rows} reused ({len(plan.add_dropout)} given dropout embeddings), "
                    f"{plan.removed} removed), "
                    f"{info['counts']['shard_bytes'] / n / 1024:.1f} KiB/sample, {time.perf_counter() - start:.1f} s"
                )
            ranks.barrier()
    return [plan.cache_dir for plan in plans]


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
            f"cache {plan.cache_dir}: {plan.reuse.num_rows} up to date{added}, {len(plan.encode)} to encode, "
            f"{plan.removed} removed"
        )
    return plans


def save_validation(plan: Plan, config: Config, report: Report) -> None:
    """Keep what validation learned about this cache's image files, for the next build (if it changed)."""
    path = plan.cache_dir / VALIDATION
    if report.records_current and path.exists():
        return
    roots = tuple(os.path.join(d.instance_data_dir, "") for d in [plan.main, *config.conditioning_for(plan.main)])
    save_records(path, {p: r for p, r in report.files.items() if str(p).startswith(roots)})


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
