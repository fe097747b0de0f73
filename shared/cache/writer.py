"""Writing a cache dir so that a kill or a power loss at any moment loses at most the shard in progress.

- A shard is written as `shards/NAME.tar.tmp`, hashed as it is written (the whole file, each record
  and each member: its bytes are never read back); when complete it is fsynced and renamed to
  `shards/NAME.tar`.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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


class ShardFile:
    """A tar archive written front to back and hashed as it is written: the whole file, each record (a
    sample's members with their headers and padding) and each member's data. Nothing is read back.

    The bytes are those Python's tarfile writes for webdataset's `TarWriter(mtime=0)`: per member a
    512-byte header (mode 0444, owner "bigdata", mtime 0; member names in sorted order), its data, zeros
    to a 512-byte boundary; at the end two zero blocks and zeros to a 10240-byte tar record. Written
    here, a member's data goes to the file and the hashes in one call each, outside the GIL (the tar
    stream cut it into 10 KiB pieces, thousands of Python calls per sample competing with the encoders).
    """

    def __init__(self, path: Path):
        self.file = open(path, "wb")  # noqa: SIM115 -- closed by `close`
        self.whole = hashlib.sha256()
        self.position = 0  # bytes written so far

    def add_record(self, key: str, members: dict[str, bytes]) -> Record:
        """Append the members of record `key` (`<key>.<member>` in the tar)."""
        start, record = self.position, hashlib.sha256()
        located: dict[str, tuple[int, int, bytes]] = {}
        for member in sorted(members):  # webdataset's order
            data = members[member]
            info = tarfile.TarInfo(f"{key}.{member}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
            self.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), record)
            located[member] = (self.position, len(data), hashlib.sha256(data).digest())
            self.write(data, record)
            self.write(bytes(-len(data) % tarfile.BLOCKSIZE), record)
        return Record(start, self.position - start, record.digest(), located)

    def write(self, data: bytes, record=None) -> None:
        """Append `data`, hashed into the whole file's sha256 and, if given, the record's."""
        self.file.write(data)
        self.whole.update(data)
        if record is not None:
            record.update(data)
        self.position += len(data)

    def close(self) -> None:
        """End the archive (two zero blocks, then zeros to a whole tar record) and close the file."""
        end = self.position + 2 * tarfile.BLOCKSIZE
        self.write(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self.file.close()


@dataclass
class Record:
    """Where a record landed in its shard: its span, its sha256, and per member (data offset, size, sha256)."""

    offset: int
    size: int
    sha256: bytes
    members: dict[str, tuple[int, int, bytes]]


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
        self._file: ShardFile | None = None
        self._name = ""
        self._bytes = 0

    def write(self, sample_id: str, members: dict[str, bytes], row: dict[str, Any]) -> None:
        """Add one record; `members` maps each of this writer's members to its bytes, `row` holds the other
        columns (a dropout record's: `source_sha256`)."""
        try:
            if self._file is None:
                self._name = f"{SHARDS_DIR}/{self.prefix}{self._next:06d}.tar"
                self._next += 1
                self._file = ShardFile(self.cache_dir / (self._name + ".tmp"))
                self._bytes = 0
            record = self._file.add_record(sample_id, {m: members[m] for m in self.members})
        except OSError as err:
            self._abandon_shard()  # it may end in half a record: never sealed; a rerun encodes its samples again
            raise disk_error(err, self.cache_dir) from err
        if self.dropout:
            row = dict(row, sample_id=sample_id, **{DROPOUT_SHARD: self._name})
        else:
            row = dict(
                row,
                sample_id=sample_id,
                shard=self._name,
                record_offset=record.offset,
                record_size=record.size,
                record_sha256=record.sha256,
            )
        for member, (offset, size, digest) in record.members.items():
            row[member_column(member, "offset")] = offset
            row[member_column(member, "size")] = size
            row[member_column(member, "sha256")] = digest
        self._pending.append(row)
        self._bytes += sum(len(b) for b in members.values())
        if self._bytes >= self.max_shard_bytes:
            self.finish_shard()

    def _abandon_shard(self) -> None:
        """Drop the open shard: its file (`.tmp`) and the rows it was to hold."""
        if self._file is not None:
            try:
                self._file.file.close()  # flushes what is buffered: fails again on a full disk
            except OSError:
                pass  # closed all the same; the file goes below
            (self.cache_dir / (self._name + ".tmp")).unlink(missing_ok=True)
        self._file, self._pending = None, []

    def finish_shard(self) -> None:
        """Close the open shard, make it durable, then write its index file."""
        if self._file is None:
            return
        try:
            file, self._file = self._file, None
            file.close()
            final = self.cache_dir / self._name
            shard = {"bytes": file.position, "sha256": file.whole.hexdigest()}
            publish(final.with_name(final.name + ".tmp"), final)
            write_rows(self._pending, index_path(final), self.fingerprint, {self._name: shard})
        except OSError as err:
            raise disk_error(err, self.cache_dir) from err
        self.rows.extend(self._pending)
        self.shards[self._name] = shard
        self._pending = []


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
