"""Writing a cache so that a kill or a power loss at any moment loses at most the shard in progress.

A cache is a local dir or an fsspec URL (`s3://...`); `CacheFolder` (shared/cache/folder.py) makes each
file appear whole or not at all on either.

- A shard is written as `shards/NAME.tar.tmp` (at a URL: uploaded as `shards/NAME.tar`, which appears
  when the upload completes), hashed as it is written (the whole file, each record and each member:
  its bytes are never read back); when complete it is fsynced and renamed to `shards/NAME.tar`.
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
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.cache.folder import CacheFolder
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
from shared.parquet import read_parquet

ShardTable = dict[str, dict[str, Any]]  # "shards/NAME.tar" -> {"bytes": n, "sha256": hex}


def index_name(shard: str) -> str:
    """`shards/NAME.index.parquet` of `shards/NAME.tar`."""
    return shard.removesuffix(".tar") + ".index.parquet"


@dataclass
class TarRecord:
    """One record's bytes as a shard holds them (per member, sorted by name: its tar header, its data, zeros
    to a 512-byte boundary), hashed. Made anywhere (the Ray engine makes them on its encoding actors), then
    appended to a shard by `ShardFile.append`: the bytes do not depend on where the record lands."""

    key: str  # the sample id: members are `<key>.<member>` in the tar
    chunks: list  # the record's bytes in pieces (bytes, or any bytes-like buffer), not joined: no copy is made
    size: int
    sha256: bytes
    members: dict[str, tuple[int, int, bytes]]  # per member: (data offset within the record, size, sha256)


def tar_record(key: str, members: dict[str, bytes]) -> TarRecord:
    """Record `key` of `members`, as Python's tarfile writes it for webdataset's `TarWriter(mtime=0)`: per
    member a 512-byte header (mode 0444, owner "bigdata", mtime 0; members in sorted order), its data, zeros
    to a 512-byte boundary."""
    chunks: list[bytes] = []
    digest, position = hashlib.sha256(), 0
    located: dict[str, tuple[int, int, bytes]] = {}
    for member in sorted(members):  # webdataset's order
        data = members[member]
        info = tarfile.TarInfo(f"{key}.{member}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        located[member] = (position + len(header), len(data), hashlib.sha256(data).digest())
        for piece in (header, data, bytes(-len(data) % tarfile.BLOCKSIZE)):
            chunks.append(piece)
            digest.update(piece)
            position += len(piece)
    return TarRecord(key, chunks, position, digest.digest(), located)


class ShardFile:
    """A tar archive written front to back, its sha256 computed as it is written: records (`tar_record`),
    then at `close` two zero blocks and zeros to a 10240-byte tar record, as tarfile ends an archive.
    Nothing is read back. Each piece goes to the file and the hash in one call, outside the GIL (webdataset's
    tar stream cut members into 10 KiB pieces, thousands of Python calls per sample competing with the
    encoders)."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.whole = hashlib.sha256()
        self.position = 0  # bytes written so far

    def append(self, record: TarRecord) -> Record:
        """Append `record`; where it landed."""
        start = self.position
        for piece in record.chunks:
            self.write(piece)
        members = {m: (start + offset, size, digest) for m, (offset, size, digest) in record.members.items()}
        return Record(start, record.size, record.sha256, members)

    def write(self, data: bytes) -> None:
        """Append `data`, hashed into the whole file's sha256."""
        self.file.write(data)
        self.whole.update(data)
        self.position += memoryview(data).nbytes

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
        folder: CacheFolder,
        fingerprint: str,
        max_shard_bytes: int = 1_000_000_000,
        prefix: str = "",
        dropout: bool = False,
    ):
        self.folder = folder
        self.fingerprint = fingerprint
        self.max_shard_bytes = max_shard_bytes
        self.dropout = dropout
        self.members = (DROPOUT,) if dropout else MEMBERS
        # "rankNN-" in a distributed build, so ranks never pick the same name; then "dropout-" for dropout records
        self.prefix = prefix + (DROPOUT_PREFIX if dropout else "")
        taken = [
            int(m["number"])
            for name in folder.listing(SHARDS_DIR)
            if (m := SHARD_NAME.match(name.removesuffix(".tmp"))) and m["prefix"] == self.prefix
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
        self.write_record(tar_record(sample_id, {m: members[m] for m in self.members}), row)

    def write_record(self, record: TarRecord, row: dict[str, Any]) -> None:
        """Add one record made by `tar_record` (of exactly this writer's members); `row` as for `write`."""
        if sorted(record.members) != sorted(self.members):
            raise ValueError(f"record {record.key} holds {sorted(record.members)}; this writer's are {self.members}")
        sample_id = record.key
        try:
            if self._file is None:
                self._name = f"{SHARDS_DIR}/{self.prefix}{self._next:06d}.tar"
                self._next += 1
                self._file = ShardFile(self.folder.create(self._name))
                self._bytes = 0
            located = self._file.append(record)
        except OSError as err:
            self._abandon_shard()  # it may end in half a record: never sealed; a rerun encodes its samples again
            raise disk_error(err, self.folder) from err
        if self.dropout:
            row = dict(row, sample_id=sample_id, **{DROPOUT_SHARD: self._name})
        else:
            row = dict(
                row,
                sample_id=sample_id,
                shard=self._name,
                record_offset=located.offset,
                record_size=located.size,
                record_sha256=located.sha256,
            )
        for member, (offset, size, digest) in located.members.items():
            row[member_column(member, "offset")] = offset
            row[member_column(member, "size")] = size
            row[member_column(member, "sha256")] = digest
        self._pending.append(row)
        self._bytes += sum(size for _, size, _ in record.members.values())
        if self._bytes >= self.max_shard_bytes:
            self.finish_shard()

    def _abandon_shard(self) -> None:
        """Drop the open shard: its file (`.tmp`) and the rows it was to hold."""
        if self._file is not None:
            self.folder.abandon(self._name, self._file.file)
        self._file, self._pending = None, []

    def finish_shard(self) -> None:
        """Close the open shard, make it durable, then write its index file."""
        if self._file is None:
            return
        try:
            file, self._file = self._file, None
            file.close()
            shard = {"bytes": file.position, "sha256": file.whole.hexdigest()}
            self.folder.seal(self._name, file.file)
            data = manifest_bytes(self._pending, self.fingerprint, {self._name: shard})
            self.folder.publish(index_name(self._name), data)
        except OSError as err:
            raise disk_error(err, self.folder) from err
        self.rows.extend(self._pending)
        self.shards[self._name] = shard
        self._pending = []


def read_existing_rows(folder: CacheFolder, fingerprint: str) -> tuple[pa.Table, ShardTable]:
    """Rows already encoded under `fingerprint` (a table with the manifest's schema) and their shards:
    the manifest's, then any finished shard's of an interrupted build (a later row of one sample wins)."""
    tables: list[pa.Table] = []
    shards: ShardTable = {}
    table = _read_parquet(folder.read(MANIFEST))  # None: missing, cut short or damaged: its rows are encoded again
    if table is not None and manifest_metadata(table.schema)["fingerprint"] == fingerprint:
        tables.append(table)
        shards.update(manifest_metadata(table.schema)["shards"])
        check_shard_paths(table, folder.url(MANIFEST))
    present = folder.listing(SHARDS_DIR)
    for name in sorted(n for n in present if n.endswith(".index.parquet")):
        index = f"{SHARDS_DIR}/{name}"
        table = _read_parquet(folder.read(index))  # None: an index cut short by a kill: its shard is encoded again
        if table is None:
            continue
        meta = manifest_metadata(table.schema)
        if name.removesuffix(".index.parquet") + ".tar" in present and meta["fingerprint"] == fingerprint:
            check_shard_paths(table, folder.url(index))
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


def _read_parquet(data: bytes | None) -> pa.Table | None:
    """The Parquet file `data` as a table; None when there is none or it cannot be read."""
    if data is None:
        return None
    try:
        return read_parquet(io.BytesIO(data))
    except (OSError, pa.ArrowException):
        return None


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


def manifest_bytes(rows: list[dict[str, Any]], fingerprint: str, shards: ShardTable) -> bytes:
    """`rows` as a Parquet file with the manifest's schema; fingerprint and shard table in its metadata."""
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    table = table.replace_schema_metadata(
        {"fingerprint": fingerprint, "format_version": str(FORMAT_VERSION), "shards": json.dumps(shards)}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def commit(folder: CacheFolder, rows: list[dict[str, Any]], shards: ShardTable, info: dict[str, Any]) -> None:
    """Publish `rows` as the cache's manifest, write cache.json, then remove what nothing references."""
    live = {r["shard"] for r in rows} | {r[DROPOUT_SHARD] for r in rows if r.get(DROPOUT_SHARD)}
    missing = live - set(shards)
    if missing:
        raise RuntimeError(f"no size and sha256 recorded for shard(s) {sorted(missing)}")
    try:
        data = manifest_bytes(rows, info["fingerprint"]["sha256"], {s: shards[s] for s in sorted(live)})
        folder.publish(MANIFEST, data)
        info = dict(info, manifest_sha256=hashlib.sha256(data).hexdigest())  # verify checks the manifest
        folder.publish(CACHE_JSON, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        folder.remove(DAMAGED)  # what `prep verify` found is encoded again by now
    except OSError as err:
        raise disk_error(err, folder) from err
    for name in folder.listing(SHARDS_DIR):
        relative = f"{SHARDS_DIR}/{name}"
        if name.endswith((".tmp", ".index.parquet")) or (name.endswith(".tar") and relative not in live):
            folder.remove(relative)


def disk_error(err: OSError, folder: CacheFolder) -> Exception:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"{folder}: the disk is full. Nothing already cached was lost: free some space and run "
            "`prep build-cache` again; it continues from the last complete shard."
        )
    return err
