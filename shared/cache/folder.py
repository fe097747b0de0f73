"""The folder a cache build writes: a local dir, or any fsspec URL (`s3://bucket/cache`, `gs://...`).

Every file a build publishes must appear whole or not at all, so that a kill at any moment leaves the
last cache readable (see shared/cache/writer.py). The two kinds of folder get there differently:

- local: write `NAME.tmp`, fsync it, rename it to `NAME`, fsync the dir (shared/files.py);
- URL (S3, `s3://`): write `NAME` itself. S3 makes an object visible only when its upload completes:
  a shard is a multipart upload completed explicitly at `seal` (never by closing the file: fsspec closes
  files it collects, which would publish half a shard after an error), only where no object of that name
  exists (`If-None-Match`); the small files are single PUTs. An upload never sealed leaves no object.
  (A multipart upload cut short by a kill stays invisible and billed until the bucket's lifecycle rule
  `AbortIncompleteMultipartUpload` removes it.)

`CacheStore` (shared/cache/store.py) is what reads a finished cache; this is what builds one.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

import fsspec

from shared.files import publish, write_atomic


class CacheFolder:
    """One cache's folder, local or at a URL: files published whole, shards streamed, listings, deletions.
    `relative` names are POSIX paths inside the cache (`manifest.parquet`, `shards/000001.tar`)."""

    def __init__(self, location: str | os.PathLike):
        location = str(location)
        location = location.removeprefix("file://")  # a local path written as a URL
        self.location = location.rstrip("/") or location
        self.local: Path | None = None if "://" in self.location else Path(self.location)
        self.protocol = "file" if self.local else self.location.split("://", 1)[0]
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root = ""

    def __str__(self) -> str:
        return self.location

    def __repr__(self) -> str:
        return f"CacheFolder({self.location!r})"

    def url(self, relative: str) -> str:
        """`relative` as a user would type it, for messages."""
        return str(self.local / relative) if self.local else f"{self.location}/{relative}"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs, self._root = fsspec.core.url_to_fs(self.location)
        return self._fs

    def _path(self, relative: str) -> str:
        self.fs  # noqa: B018 - sets _root
        return f"{self._root}/{relative}"

    def make(self) -> None:
        """Create the folder (an object store has none to create)."""
        if self.local:
            self.local.mkdir(parents=True, exist_ok=True)

    def open(self, relative: str) -> BinaryIO:
        """The file, to read (Parquet reads only the columns it needs through it)."""
        if self.local:
            return open(self.local / relative, "rb")  # noqa: SIM115 - the caller closes it
        return self.fs.open(self._path(relative), "rb")

    def read(self, relative: str) -> bytes | None:
        """The file's bytes; None when it does not exist."""
        try:
            if self.local:
                return (self.local / relative).read_bytes()
            return self.fs.cat_file(self._path(relative))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def exists(self, relative: str) -> bool:
        if self.local:
            return (self.local / relative).is_file()
        return self.fs.exists(self._path(relative))

    def listing(self, folder: str) -> dict[str, int]:
        """{name: size in bytes} of the files directly in `folder`; empty when it does not exist."""
        if self.local:
            directory = self.local / folder
            if not directory.is_dir():
                return {}
            return {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
        self.fs.invalidate_cache()  # another process (a rank, the last build) may have written since
        try:
            entries = self.fs.ls(self._path(folder), detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in entries if e["type"] == "file"}

    def publish(self, relative: str, data: bytes) -> None:
        """Replace the file with `data`: a reader sees the old file or the new one, never half."""
        if self.local:
            write_atomic(self.local / relative, data)
        else:
            self.fs.pipe_file(self._path(relative), data)

    def publish_new(self, relative: str, data: bytes) -> str:
        """Write the S3 object only if none exists (FileExistsError if one does): S3's conditional write
        (`If-None-Match: *`), so of two writers exactly one succeeds. Returns the version written (its ETag)."""
        bucket, key, _ = self.fs.split_path(self._path(relative))
        try:
            written = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except OSError as err:  # s3fs names the failed precondition FileExistsError, or EINVAL as for If-Match
            if isinstance(err, FileExistsError) or err.errno == errno.EINVAL:
                raise FileExistsError(self.url(relative)) from None
            raise
        self.fs.invalidate_cache(self._path(relative))
        return written["ETag"]

    def version(self, relative: str) -> tuple[str, float]:
        """(ETag, when the store last wrote it: seconds since the epoch by the store's clock) of an object.
        FileNotFoundError if there is none."""
        info = self.fs.info(self._path(relative), refresh=True)
        return info["ETag"], info["LastModified"].timestamp()

    def replace_if(self, relative: str, data: bytes, etag: str) -> str | None:
        """Overwrite the S3 object only if it is still version `etag` (S3's `If-Match`): the version written
        (taken from the write's own answer: a version read afterwards may be another writer's), or None if it
        had changed."""
        bucket, key, _ = self.fs.split_path(self._path(relative))
        try:
            written = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
        except (FileNotFoundError, OSError) as err:  # s3fs gives a failed precondition as EINVAL
            if isinstance(err, FileNotFoundError) or err.errno == errno.EINVAL:
                return None
            raise
        self.fs.invalidate_cache(self._path(relative))
        return written["ETag"]

    def remove(self, relative: str) -> None:
        """Delete the file, if it exists."""
        if self.local:
            (self.local / relative).unlink(missing_ok=True)
        else:
            try:
                self.fs.rm_file(self._path(relative))
            except FileNotFoundError:
                pass

    def create(self, relative: str) -> BinaryIO:
        """A file to write front to back, that becomes `relative` only at `seal` (local: `relative.tmp`
        until then; URL: the upload completes when the file is closed)."""
        if self.local:
            path = self.local / (relative + ".tmp")
            path.parent.mkdir(parents=True, exist_ok=True)
            return open(path, "wb")  # noqa: SIM115 - the caller closes it
        # Not committed at close: only `seal` publishes it, and only where no object of that name exists.
        return self.fs.open(self._path(relative), "xb", autocommit=False)

    def seal(self, relative: str, file: BinaryIO) -> None:
        """Give the file `create` made, now closed, its name, durably."""
        if self.local:
            final = self.local / relative
            publish(final.with_name(final.name + ".tmp"), final)
        else:
            file.commit()

    def abandon(self, relative: str, file: BinaryIO) -> None:
        """Throw away a file `create` made and never sealed: nothing of it remains under any name."""
        if self.local:
            try:
                file.close()  # flushes what is buffered: fails again on a full disk
            except OSError:
                pass  # closed all the same
            (self.local / (relative + ".tmp")).unlink(missing_ok=True)
            return
        try:
            file.discard()  # the multipart upload is aborted
        finally:
            file.closed = True  # nothing more to send when fsspec closes it on collection
