"""What a cache build has to do: compare the dataset with what the cache holds (rows to reuse, samples to
encode, dropout records to add, rows to drop), and refuse a cache built with other settings.

Nothing here encodes or writes a shard; `prep/build.py` carries the plan out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from prep.file_records import FileRecord
from prep.sample_records import source_sha256
from prep.scan import Sample
from shared.cache import (
    DROPOUT_COLUMNS,
    DROPOUT_SHARD,
    MANIFEST_SCHEMA,
    CacheFolder,
    needs_dropout,
)
from shared.cache.fingerprint import fingerprint
from shared.cache.validity import damaged_shards, holds_uncommitted_work, judge_for_build
from shared.cache.writer import ShardTable, read_existing_rows
from shared.config import Config, DatasetConfig


@dataclass
class Plan:
    """What one cache needs: rows to keep as they are, samples to encode, and why."""

    main: DatasetConfig
    folder: CacheFolder  # the cache: a local dir or a URL
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
    folder = CacheFolder(config.cache_location_for(main))
    plan = Plan(main, folder, fingerprint(config, main, dtype))
    judged = judge_for_build(folder, plan.fingerprint, force)
    built = judged.manifest  # (fingerprint, sample ids) of the manifest
    existing, plan.shards = (None, {}) if judged.force else read_existing_rows(folder, plan.fingerprint["sha256"])
    position, source, dropped_records = {}, [], False
    if existing is not None:  # sample id -> its (last) row, compared by columns: no Python object per row
        damaged = damaged_shards(folder, plan.shards)
        kept_records = existing
        existing = without_dropout_records_in(existing, damaged)
        dropped_records = existing is not kept_records
        shards = existing.column("shard").to_pylist()
        position = {i: n for n, i in enumerate(existing.column("sample_id").to_pylist()) if shards[n] not in damaged}
        source = existing.column("source_sha256").to_pylist()
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
        plan.manifest_current = (
            built[1] == kept and not holds_uncommitted_work(folder) and not dropped_records and judged.recorded
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
