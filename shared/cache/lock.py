"""The exclusive lock a cache build holds, so two builds never write one cache dir."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from shared.errors import UserError


class CacheLock:
    """An exclusive lock on one cache dir for the length of a build (`with CacheLock(dir): ...`).

    The lock is an `flock` on `<cache>/build.lock`, which the kernel releases when its process
    dies, so a killed build never blocks the next one; the file names the holder (pid, host,
    start, command) so a refused build can say who holds it, and a new holder can say that the
    previous one ended without releasing it.
    """

    def __init__(self, cache_dir: Path, name: str):
        self.path = Path(cache_dir) / name
        self._fd: int | None = None
        self.stale: dict | None = None  # the previous holder, when it was killed mid-build

    def __enter__(self) -> CacheLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # a read-only disk or folder, or one this user may not write
            raise UserError(
                f"{self.path.parent}: cannot write this cache ({err.strerror}). Make the folder writable, or point "
                "cache_dir (cache_dir_vae) of the dataset at a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
                f"(`{holder.get('command')}`)"
                if holder
                else "another process"
            )
            raise UserError(
                f"{self.path.parent}: another `prep build-cache` is writing this cache: {who}. Wait for it to "
                "finish (or stop it), then run again; two builds of one cache would overwrite each other."
            ) from None
        self.stale = _read_holder(fd) or None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: released cleanly (a killed holder leaves its name)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
