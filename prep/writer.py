"""Write records into a cache dir so that a kill at any moment loses at most the shard in progress.

- A shard is written as `shards/NAME.tar.tmp` and renamed to `shards/NAME.tar` when complete.
- Right after the rename, `shards/NAME.index.parquet` records its rows (offsets, hashes) and the
  fingerprint they were encoded under. A rerun reuses these rows instead of re-encoding.
- `commit` writes `manifest.parquet` atomically (the fingerprint in its metadata), then
  `cache.json`, then deletes what the manifest no longer references (old shards, index files,
  temporaries). Until the new manifest lands, the old one and every shard it names are untouched.
"""

from __future__ import annotations

import errno
import hashlib
import re
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from shared.cache_format import (
    CACHE_JSON,
    MANIFEST,
    MANIFEST_SCHEMA,
    MEMBERS,
    SHARDS_DIR,
    member_column,
    write_json_atomic,
    write_manifest,
)
from shared.errors import UserError

_SHARD_NAME = re.compile(r"^(?P<prefix>(?:rank\d+-)?)(?P<number>\d{6})\.tar$")


def _index_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".tar") + ".index.parquet")


class ShardWriter:
    """Append records to new shards `shards/[rankNN-]NNNNNN.tar`, starting a new one past `max_shard_bytes`."""

    def __init__(self, cache_dir: Path, fingerprint: str, max_shard_bytes: int = 1_000_000_000, prefix: str = ""):
        self.cache_dir = cache_dir
        self.fingerprint = fingerprint
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix  # "rankNN-" in a distributed build, so ranks never pick the same name
        (cache_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        taken = [
            int(m["number"])
            for p in (cache_dir / SHARDS_DIR).iterdir()
            if (m := _SHARD_NAME.match(p.name.removesuffix(".tmp"))) and m["prefix"] == prefix
        ]
        self._next = max(taken, default=-1) + 1  # never reuse a name: old shards stay until commit
        self.rows: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._name = ""
        self._bytes = 0

    def write(self, sample_id: str, members: dict[str, bytes], row: dict[str, Any]) -> None:
        """Add one record; `members` maps each name in MEMBERS to its bytes, `row` holds the other columns."""
        try:
            if self._tar is None:
                self._name = f"{SHARDS_DIR}/{self.prefix}{self._next:06d}.tar"
                self._next += 1
                self._tar = wds.TarWriter(str(self.cache_dir / (self._name + ".tmp")))
                self._bytes = 0
            self._tar.write({"__key__": sample_id, **members})
        except OSError as err:
            raise _disk_error(err, self.cache_dir) from err
        row = dict(row, sample_id=sample_id, shard=self._name)
        for member in MEMBERS:
            row[member_column(member, "sha256")] = hashlib.sha256(members[member]).hexdigest()
        self._pending.append(row)
        self._bytes += sum(len(b) for b in members.values())
        if self._bytes >= self.max_shard_bytes:
            self.finish_shard()

    def finish_shard(self) -> None:
        """Close the open shard: rename it into place, then record its rows in its index file."""
        if self._tar is None:
            return
        try:
            self._tar.close()
            self._tar = None
            final = self.cache_dir / self._name
            tmp = final.with_name(final.name + ".tmp")
            offsets = _member_offsets(tmp)
            for row in self._pending:
                for member in MEMBERS:
                    offset, size = offsets[f"{row['sample_id']}.{member}"]
                    row[member_column(member, "offset")] = offset
                    row[member_column(member, "size")] = size
            tmp.replace(final)
            _write_rows(self._pending, _index_path(final), self.fingerprint)
        except OSError as err:
            raise _disk_error(err, self.cache_dir) from err
        self.rows.extend(self._pending)
        self._pending = []


def read_existing_rows(cache_dir: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    """Rows already encoded under `fingerprint`: the manifest's, then any finished shard's of an interrupted build."""
    rows: dict[str, dict[str, Any]] = {}
    manifest = cache_dir / MANIFEST
    if manifest.is_file() and manifest_fingerprint(manifest) == fingerprint:
        rows.update({r["sample_id"]: r for r in pq.read_table(manifest).to_pylist()})
    shards = cache_dir / SHARDS_DIR
    for index in sorted(shards.glob("*.index.parquet")) if shards.is_dir() else []:
        shard = index.with_name(index.name.removesuffix(".index.parquet") + ".tar")
        try:
            table = pq.read_table(index)
        except (OSError, pa.ArrowInvalid):
            continue  # an index cut short by a kill: its shard is simply encoded again
        meta = table.schema.metadata or {}
        if shard.is_file() and meta.get(b"fingerprint", b"").decode() == fingerprint:
            rows.update({r["sample_id"]: r for r in table.to_pylist()})
    return rows


def manifest_fingerprint(manifest: Path) -> str:
    meta = pq.read_schema(manifest).metadata or {}
    return meta.get(b"fingerprint", b"").decode()


def commit(cache_dir: Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """Publish `rows` as the cache's manifest, write cache.json, then remove what nothing references."""
    try:
        write_manifest(rows, cache_dir / MANIFEST, metadata={"fingerprint": info["fingerprint"]["sha256"]})
        write_json_atomic(cache_dir / CACHE_JSON, info)
    except OSError as err:
        raise _disk_error(err, cache_dir) from err
    live = {r["shard"] for r in rows}
    for path in (cache_dir / SHARDS_DIR).iterdir():
        relative = f"{SHARDS_DIR}/{path.name}"
        if path.name.endswith((".tmp", ".index.parquet")) or (path.suffix == ".tar" and relative not in live):
            path.unlink(missing_ok=True)


def _write_rows(rows: list[dict[str, Any]], path: Path, fingerprint: str) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA).replace_schema_metadata({"fingerprint": fingerprint})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _member_offsets(tar_path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (byte offset of its data in the tar, size in bytes)."""
    with tarfile.open(tar_path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


def _disk_error(err: OSError, cache_dir: Path) -> Exception:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"{cache_dir}: the disk is full. Nothing already cached was lost: free some space and run "
            "`prep build-cache` again; it continues from the last complete shard."
        )
    return err
