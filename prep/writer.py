"""Write records into webdataset shards and the manifest rows that locate every member.

A shard is written under a temporary name and renamed once complete, so a reader never sees a
half-written tar. Member offsets come from the finished tar's own headers.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Any

import webdataset as wds

from shared.cache_format import MEMBERS, SHARDS_DIR, member_column


class ShardWriter:
    """Append records to `<cache>/shards/NNNNNN.tar`, starting a new shard past `max_shard_bytes`."""

    def __init__(self, cache_dir: Path, max_shard_bytes: int = 1_000_000_000):
        self.cache_dir = cache_dir
        self.max_shard_bytes = max_shard_bytes
        (cache_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []  # manifest rows of finished shards
        self._pending: list[dict[str, Any]] = []  # rows of the open shard, offsets not yet known
        self._shard_index = 0
        self._tar: wds.TarWriter | None = None
        self._bytes = 0

    def _shard_name(self) -> str:
        return f"{SHARDS_DIR}/{self._shard_index:06d}.tar"

    def write(self, sample_id: str, members: dict[str, bytes], row: dict[str, Any]) -> None:
        """Add one record; `members` maps each name in MEMBERS to its bytes, `row` holds the other columns."""
        if self._tar is None:
            self._tar = wds.TarWriter(str(self.cache_dir / (self._shard_name() + ".tmp")))
            self._bytes = 0
        self._tar.write({"__key__": sample_id, **members})
        row = dict(row, sample_id=sample_id, shard=self._shard_name())
        for member in MEMBERS:
            row[member_column(member, "sha256")] = hashlib.sha256(members[member]).hexdigest()
        self._pending.append(row)
        self._bytes += sum(len(b) for b in members.values())
        if self._bytes >= self.max_shard_bytes:
            self._close_shard()

    def close(self) -> list[dict[str, Any]]:
        """Finish the open shard; return the manifest rows of everything written."""
        self._close_shard()
        return self.rows

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        final = self.cache_dir / self._shard_name()
        tmp = final.with_name(final.name + ".tmp")
        offsets = _member_offsets(tmp)
        for row in self._pending:
            for member in MEMBERS:
                offset, size = offsets[f"{row['sample_id']}.{member}"]
                row[member_column(member, "offset")] = offset
                row[member_column(member, "size")] = size
        tmp.replace(final)
        self.rows.extend(self._pending)
        self._pending = []
        self._shard_index += 1


def _member_offsets(tar_path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (byte offset of its data in the tar, size in bytes)."""
    with tarfile.open(tar_path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
