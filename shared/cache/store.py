"""Reading a cache from a local dir or any fsspec URL (`s3://`, `gs://`, `https://`, ...).

`CacheStore` is the one reader: `train` loads samples through it and `prep verify` checks shards
through it. The manifest stays an Arrow table (columns, not Python dicts), and every path taken
from it must name a shard inside the cache, so a crafted manifest cannot make a reader open
anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.cache.format import CACHE_JSON, DROPOUT, DROPOUT_SHARD, FORMAT_VERSION, MANIFEST, SHARD_NAME, SHARDS_DIR
from shared.errors import UserError
from shared.parquet import iter_parquet, read_parquet

REBUILD = "rebuild it with `prep build-cache --config ... --force`"


def parse_cache_info(text: str, where: str) -> dict[str, Any]:
    """The contents of a `cache.json` read from `where`, checked for our format version."""
    try:
        info = json.loads(text)
    except ValueError as err:
        raise UserError(f"{where}: not valid JSON ({err}); {REBUILD}") from None
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        why = " (format 1 has no shard checksums and cannot be verified byte for byte)" if version == 1 else ""
        raise UserError(f"{where}: cache format {version}, this version reads {FORMAT_VERSION}{why}; {REBUILD}")
    return info


def check_shard_path(shard: str, where: str) -> str:
    """`shard` as the manifest gives it, refused unless it names a shard file inside the cache."""
    prefix, _, name = shard.partition("/")
    if prefix != SHARDS_DIR or not SHARD_NAME.match(name):
        raise UserError(
            f"{where}: the manifest names '{shard}', which is not a shard of this cache (shards/NNNNNN.tar); "
            f"the manifest was altered: {REBUILD}"
        )
    return shard


def check_shard_paths(table: pa.Table | pa.RecordBatch, where: str) -> None:
    """`check_shard_path` for every shard a manifest table (or batch) names: its records' and dropout records'."""
    for column in ("shard", DROPOUT_SHARD):
        if column in table.schema.names:
            for shard in pc.unique(table.column(column)).drop_null().to_pylist():
                if shard or column != DROPOUT_SHARD:  # "": the dropout is inside the embeddings member
                    check_shard_path(shard, where)


def manifest_metadata(schema: pa.Schema) -> dict[str, Any]:
    """{"fingerprint": hex, "shards": {name: {"bytes": n, "sha256": hex}}} from the manifest's schema metadata."""
    meta = schema.metadata or {}
    shards = json.loads(meta.get(b"shards", b"{}").decode())
    return {"fingerprint": meta.get(b"fingerprint", b"").decode(), "shards": shards}


class CacheStore:
    """One cache, read through fsspec; opened lazily once per process (DataLoader workers too)."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location).rstrip("/")
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root = ""
        self._pid = -1

    @property
    def fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._root = fsspec.core.url_to_fs(self.location)
            self._fs.invalidate_cache()  # listings (sizes, ETags) cached by an earlier store may be stale
            self._pid = os.getpid()
        return self._fs, self._root

    def __getstate__(self) -> dict:  # pickled into spawned workers without the open filesystem
        return dict(self.__dict__, _fs=None, _pid=-1)

    def url(self, relative: str) -> str:
        return f"{self.location}/{relative}"

    def _path(self, relative: str) -> str:
        return f"{self.fs[1]}/{relative}"

    def exists(self, relative: str) -> bool:
        return self.fs[0].exists(self._path(relative))

    def read_info(self) -> dict[str, Any]:
        if not self.exists(CACHE_JSON):
            raise UserError(f"{self.location}: not a cache (no {CACHE_JSON}); build it with `prep build-cache`")
        return parse_cache_info(self.fs[0].cat_file(self._path(CACHE_JSON)).decode("utf-8"), self.url(CACHE_JSON))

    def read_file(self, relative: str) -> bytes:
        return self.fs[0].cat_file(self._path(relative))

    def write_file(self, relative: str, data: bytes) -> None:
        with self.fs[0].open(self._path(relative), "wb") as f:
            f.write(data)

    def manifest_as_written(self, info: dict[str, Any]) -> bool:
        """The manifest's bytes are those the build wrote: cache.json (`info`) records their sha256 (caches
        written before it was recorded: assumed)."""
        recorded = info.get("manifest_sha256")
        return not recorded or hashlib.sha256(self.read_file(MANIFEST)).hexdigest() == recorded

    def manifest_columns(self) -> list[str]:
        """The manifest's column names (caches written before a column existed lack it)."""
        if not self.exists(MANIFEST):
            raise UserError(f"{self.location}: no {MANIFEST}; build the cache first with `prep build-cache`")
        with self._readable_manifest(), self.fs[0].open(self._path(MANIFEST), "rb") as f:
            return pq.read_schema(f).names

    @contextmanager
    def _readable_manifest(self) -> Iterator[None]:
        """A manifest Parquet cannot read (cut short, overwritten) is the user's to repair, with the command."""
        try:
            yield
        except pa.ArrowException as err:
            raise UserError(
                f"{self.url(MANIFEST)}: unreadable ({str(err).splitlines()[0]}): cut short or damaged. Run "
                "`prep build-cache` again: it encodes the samples again (the manifest is what located them) and "
                "writes a new one"
            ) from None

    def read_manifest(self, columns: list[str] | None = None) -> pa.Table:
        """The manifest as an Arrow table (only `columns`, if given), its schema metadata kept."""
        if not self.exists(MANIFEST):
            raise UserError(f"{self.location}: no {MANIFEST}; build the cache first with `prep build-cache`")
        fs, _ = self.fs
        with self._readable_manifest(), fs.open(self._path(MANIFEST), "rb") as f:
            table = read_parquet(f, columns)
        check_shard_paths(table, self.url(MANIFEST))
        return table

    def iter_manifest(self, columns: list[str], rows_per_batch: int = 65_536) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(total rows, batch) for each record batch of `columns`: memory stays that of one batch however
        long the manifest is. Every batch's shard paths are checked (see `check_shard_path`)."""
        if not self.exists(MANIFEST):
            raise UserError(f"{self.location}: no {MANIFEST}; build the cache first with `prep build-cache`")
        fs, _ = self.fs
        with self._readable_manifest(), fs.open(self._path(MANIFEST), "rb") as f:
            for total, batch in iter_parquet(f, columns, rows_per_batch):
                check_shard_paths(batch, self.url(MANIFEST))
                yield total, batch

    def read_range(self, shard: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a shard named by the manifest (confined to the cache's shards)."""
        return self.fs[0].cat_file(self._path(check_shard_path(shard, self.url(MANIFEST))), start=start, end=end)

    def read_member(self, row: dict[str, Any], member: str) -> bytes:
        """One member's bytes of a manifest row (as `read_manifest().to_pylist()` gives rows)."""
        offset, size = row[f"{member.split('.')[0]}_offset"], row[f"{member.split('.')[0]}_size"]
        shard = row[DROPOUT_SHARD] if member == DROPOUT else row["shard"]
        return self.read_range(shard, offset, offset + size)

    def shard_size(self, shard: str) -> int | None:
        """Bytes of `shard`, or None when it is missing."""
        fs, _ = self.fs
        path = self._path(check_shard_path(shard, self.url(MANIFEST)))
        return fs.size(path) if fs.exists(path) else None

    def open_shard(self, shard: str):
        """A binary file object over `shard` (streamed; for whole-file hashes and tar walks)."""
        return self.fs[0].open(self._path(check_shard_path(shard, self.url(MANIFEST))), "rb", block_size=1 << 23)

    def list_shards(self) -> Iterator[str]:
        """Every `shards/*.tar` file present, as "shards/NAME" (manifest or not)."""
        fs, root = self.fs
        if not fs.exists(f"{root}/{SHARDS_DIR}"):
            return
        for path in sorted(fs.ls(f"{root}/{SHARDS_DIR}", detail=False)):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".tar"):
                yield f"{SHARDS_DIR}/{name}"
