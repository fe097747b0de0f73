"""Writing a cache dir so that a kill or a power loss at any moment loses at most the shard in progress.

- A shard is written as `shards/NAME.tar.tmp`, hashed as it is written (the whole file and each
  record: its bytes are never read back); when complete its members are located (a walk over the
  tar headers), it is fsynced and renamed to `shards/NAME.tar`.
- Then `shards/NAME.index.parquet` records its rows, the fingerprint they were encoded under and
  the shard's size and sha256 (fsynced, atomic). A rerun reuses these rows instead of re-encoding.
  A dropout writer's rows (`dropout-` shards) hold only the dropout columns, the sample's
  `source_sha256` and the `embeds_sha256` of the embeddings member the record was stored against;
  `attach_dropout` joins them to the sample's main row holding that member.
- `commit` writes `manifest.parquet` (rows + fingerprint + the table of live shards in its schema
  metadata), then `cache.json`, both fsynced and atomic, then deletes what the manifest no longer
  references. Until the new manifest lands, the old one and every shard it names are untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import tarfile
from collections import deque
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds

from shared.cache.format import (
    CACHE_JSON,
    DAMAGED,
    DROPOUT,
    DROPOUT_COLUMNS,
    DROPOUT_INSIDE,
    DROPOUT_PREFIX,
    DROPOUT_SHARD,
    EMBEDS,
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_SCHEMA,
    MEMBERS,
    SHARD_NAME,
    SHARDS_DIR,
    member_column,
)
from shared.cache.store import check_shard_paths, manifest_metadata
from shared.errors import UserError
from shared.files import publish, write_atomic, write_json_atomic

ShardTable = dict[str, dict[str, Any]]  # "shards/NAME.tar" -> {"bytes": n, "sha256": hex}


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".tar") + ".index.parquet")


class HashingFile:
    """A file written front to back that hashes the bytes passing through: the whole file, and each
    record (`end_record` gives where one ends; records follow one another from offset 0).

    The tar stream buffers what it writes, so a record's bytes may arrive before or after its end is
    known; bytes past every known end belong to the record being written.
    """

    def __init__(self, path: Path):
        self.file = open(path, "wb")  # noqa: SIM115 -- closed by `close`, after the tar stream's last flush
        self.whole = hashlib.sha256()
        self.position = 0  # bytes written so far
        self.ends: deque[int] = deque()  # record ends not reached yet
        self.record = hashlib.sha256()
        self.records: list[bytes] = []  # sha256 of each finished record, in order

    def write(self, data) -> int:
        view = memoryview(data)
        self.file.write(view)
        self.whole.update(view)
        while len(view):
            take = min(len(view), self.ends[0] - self.position) if self.ends else len(view)
            self.record.update(view[:take])
            self.position += take
            view = view[take:]
            self._finish_reached()
        return len(data)

    def end_record(self, offset: int) -> None:
        self.ends.append(offset)
        self._finish_reached()

    def _finish_reached(self) -> None:
        if self.ends and self.position == self.ends[0]:
            self.ends.popleft()
            self.records.append(self.record.digest())
            self.record = hashlib.sha256()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ShardWriter:
    """Append records to new shards `shards/[rankNN-]NNNNNN.tar`, starting a new one past `max_shard_bytes`;
    with `dropout`, dropout records (the DROPOUT member alone) to `shards/[rankNN-]dropout-NNNNNN.tar`."""

    def __init__(
        self,
        cache_dir: Path,
        fingerprint: str,
        max_shard_bytes: int = 1_000_000_000,
        prefix: str = "",
        dropout: bool = False,
    ):
        self.cache_dir = cache_dir
        self.fingerprint = fingerprint
        self.max_shard_bytes = max_shard_bytes
        self.dropout = dropout
        self.members = (DROPOUT,) if dropout else MEMBERS
        # "rankNN-" in a distributed build, so ranks never pick the same name; then "dropout-" for dropout records
        self.prefix = prefix + (DROPOUT_PREFIX if dropout else "")
        (cache_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        taken = [
            int(m["number"])
            for p in (cache_dir / SHARDS_DIR).iterdir()
            if (m := SHARD_NAME.match(p.name.removesuffix(".tmp"))) and m["prefix"] == self.prefix
        ]
        self._next = max(taken, default=-1) + 1  # never reuse a name: old shards stay until commit
        self.rows: list[dict[str, Any]] = []
        self.shards: ShardTable = {}
        self._pending: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._file: HashingFile | None = None
        self._name = ""
        self._bytes = 0

    def write(self, sample_id: str, members: dict[str, bytes], row: dict[str, Any]) -> None:
        """Add one record; `members` maps each of this writer's members to its bytes, `row` holds the other
        columns (a dropout record's: `source_sha256`)."""
        try:
            if self._tar is None:
                self._name = f"{SHARDS_DIR}/{self.prefix}{self._next:06d}.tar"
                self._next += 1
                self._file = HashingFile(self.cache_dir / (self._name + ".tmp"))
                # mtime 0: the same records give byte-identical shards, whenever they are built.
                self._tar = wds.TarWriter(self._file, mtime=0)
                self._bytes = 0
            start = self._tar.tarstream.offset
            self._tar.write({"__key__": sample_id, **{m: members[m] for m in self.members}})
            end = self._tar.tarstream.offset  # past the record's last padding
            self._file.end_record(end)
        except OSError as err:
            self._abandon_shard()  # it may end in half a record: never sealed; a rerun encodes its samples again
            raise disk_error(err, self.cache_dir) from err
        if self.dropout:
            row = dict(row, sample_id=sample_id, **{DROPOUT_SHARD: self._name})
        else:
            row = dict(row, sample_id=sample_id, shard=self._name, record_offset=start, record_size=end - start)
        for member in self.members:
            row[member_column(member, "sha256")] = hashlib.sha256(members[member]).digest()
        self._pending.append(row)
        self._bytes += sum(len(b) for b in members.values())
        if self._bytes >= self.max_shard_bytes:
            self.finish_shard()

    def _abandon_shard(self) -> None:
        """Drop the open shard: its file (`.tmp`) and the rows it was to hold."""
        if self._file is not None:
            self._file.close()
            (self.cache_dir / (self._name + ".tmp")).unlink(missing_ok=True)
        self._tar, self._file, self._pending = None, None, []

    def finish_shard(self) -> None:
        """Close the open shard: locate its members, make it durable, then write its index file."""
        if self._tar is None:
            return
        try:
            self._tar.close()  # writes the end-of-archive blocks and flushes the stream into the file
            self._file.close()
            file, self._tar, self._file = self._file, None, None
            final = self.cache_dir / self._name
            tmp = final.with_name(final.name + ".tmp")
            members = tar_members(tmp)
            for row, digest in zip(self._pending, file.records, strict=True):
                if not self.dropout:
                    row["record_sha256"] = digest
                for member in self.members:
                    offset, size = members[f"{row['sample_id']}.{member}"]
                    row[member_column(member, "offset")] = offset
                    row[member_column(member, "size")] = size
            shard = {"bytes": file.position, "sha256": file.whole.hexdigest()}
            publish(tmp, final)
            write_rows(self._pending, index_path(final), self.fingerprint, {self._name: shard})
        except OSError as err:
            raise disk_error(err, self.cache_dir) from err
        self.rows.extend(self._pending)
        self.shards[self._name] = shard
        self._pending = []


def tar_members(path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, data size) in a tar, from its headers (seeking past the data, never reading it)."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def read_existing_rows(cache_dir: Path, fingerprint: str) -> tuple[pa.Table, ShardTable]:
    """Rows already encoded under `fingerprint` (a table with the manifest's schema) and their shards:
    the manifest's, then any finished shard's of an interrupted build (a later row of one sample wins)."""
    tables: list[pa.Table] = []
    shards: ShardTable = {}
    manifest = cache_dir / MANIFEST
    try:
        table = pq.read_table(manifest) if manifest.is_file() else None
    except (OSError, pa.ArrowException):
        table = None  # cut short or damaged: its rows are encoded again
    if table is not None and manifest_metadata(table.schema)["fingerprint"] == fingerprint:
        tables.append(table)
        shards.update(manifest_metadata(table.schema)["shards"])
        check_shard_paths(table, str(manifest))
    directory = cache_dir / SHARDS_DIR
    for index in sorted(directory.glob("*.index.parquet")) if directory.is_dir() else []:
        shard = index.with_name(index.name.removesuffix(".index.parquet") + ".tar")
        try:
            table = pq.read_table(index)
        except (OSError, pa.ArrowInvalid):
            continue  # an index cut short by a kill: its shard is simply encoded again
        meta = manifest_metadata(table.schema)
        if shard.is_file() and meta["fingerprint"] == fingerprint:
            check_shard_paths(table, str(index))
            tables.append(table)
            shards.update(meta["shards"])
    if not tables:
        return MANIFEST_SCHEMA.empty_table(), shards
    # promote: a manifest written before a column was added (embeds_form, the dropout columns) reads it as null
    tables = [MANIFEST_SCHEMA.empty_table(), *(_marked_dropout_inside(t.replace_schema_metadata(None)) for t in tables)]
    table = pa.concat_tables(tables, promote_options="default")
    dropout_records = pc.is_null(table.column("shard"))  # rows of a dropout writer's index
    if pc.any(dropout_records).as_py():
        rows = table.filter(pc.invert(dropout_records)).to_pylist()
        attach_dropout(rows, table.filter(dropout_records).to_pylist())
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    return table, shards


def _marked_dropout_inside(table: pa.Table) -> pa.Table:
    """Rows written before dropout records existed (no `dropout_shard` column): train rows get DROPOUT_INSIDE (their
    embeddings member holds the dropout), so they are neither given a second one nor read as lacking it."""
    if DROPOUT_SHARD in table.column_names:
        return table
    train = pc.equal(table.column("split"), "train")
    marker = pc.if_else(train, pa.scalar(DROPOUT_INSIDE), pa.scalar(None, pa.string()))
    return table.append_column(DROPOUT_SHARD, marker)


def attach_dropout(rows: list[dict[str, Any]], dropout_rows: list[dict[str, Any]]) -> None:
    """Fill `rows`' dropout columns from the dropout records stored against their embeddings member (the same
    sample id and `embeds_sha256`: a dropout record shares rows with that member's `prompt.0` only)."""
    key = member_column(EMBEDS, "sha256")
    found = {(r["sample_id"], r[key]): r for r in dropout_rows}
    for row in rows:
        match = found.get((row["sample_id"], row[key]))
        if match is not None:
            row.update({column: match[column] for column in DROPOUT_COLUMNS})


def manifest_fingerprint(manifest: Path) -> str:
    return manifest_metadata(pq.read_schema(manifest))["fingerprint"]


def write_rows(rows: list[dict[str, Any]], path: Path, fingerprint: str, shards: ShardTable) -> str:
    """`rows` as a Parquet file with the manifest's schema; fingerprint and shard table in its metadata.
    Returns the file's sha256 (hex)."""
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    table = table.replace_schema_metadata(
        {"fingerprint": fingerprint, "format_version": str(FORMAT_VERSION), "shards": json.dumps(shards)}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def commit(cache_dir: Path, rows: list[dict[str, Any]], shards: ShardTable, info: dict[str, Any]) -> None:
    """Publish `rows` as the cache's manifest, write cache.json, then remove what nothing references."""
    live = {r["shard"] for r in rows} | {r[DROPOUT_SHARD] for r in rows if r.get(DROPOUT_SHARD)}
    missing = live - set(shards)
    if missing:
        raise RuntimeError(f"no size and sha256 recorded for shard(s) {sorted(missing)}")
    try:
        table = {s: shards[s] for s in sorted(live)}
        digest = write_rows(rows, cache_dir / MANIFEST, info["fingerprint"]["sha256"], table)
        write_json_atomic(cache_dir / CACHE_JSON, dict(info, manifest_sha256=digest))  # verify checks the manifest
        (cache_dir / DAMAGED).unlink(missing_ok=True)  # what `prep verify` found is encoded again by now
    except OSError as err:
        raise disk_error(err, cache_dir) from err
    for path in (cache_dir / SHARDS_DIR).iterdir():
        relative = f"{SHARDS_DIR}/{path.name}"
        if path.name.endswith((".tmp", ".index.parquet")) or (path.suffix == ".tar" and relative not in live):
            path.unlink(missing_ok=True)


def disk_error(err: OSError, cache_dir: Path) -> Exception:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"{cache_dir}: the disk is full. Nothing already cached was lost: free some space and run "
            "`prep build-cache` again; it continues from the last complete shard."
        )
    return err
