"""The exclusive lock a cache build holds, so two builds never write one cache: `lock_cache(folder)`."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from shared.cache.folder import CacheFolder
from shared.errors import UserError


def lock_cache(folder: CacheFolder, name: str) -> CacheLock | ObjectLock:
    """The build lock of `folder`: an `flock` on a local dir, a lock object at an `s3://` URL."""
    if folder.local:
        return CacheLock(folder.local, name)
    if folder.protocol in ("s3", "s3a"):
        return ObjectLock(folder, name)
    raise UserError(
        f"{folder.location}: prep writes caches to local (or shared) folders and to s3:// URLs; for "
        f"{folder.protocol}:// build into a folder and copy it there (train run reads it from the URL)"
    )


def _holder() -> dict:
    """Who holds a lock: this process (and, to tell whether it still runs, the boot and pid namespace it runs in,
    and its start time)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv)[:300],
        **_process_identity(os.getpid()),
    }


def _process_identity(pid: int) -> dict:
    """What tells process `pid` of this machine apart from a later one with its number: the boot, the pid
    namespace and the process's start time (clock ticks since boot); empty where /proc cannot say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
        start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return {}
    return {"boot_id": boot, "pid_namespace": namespace, "pid_start": start}


def _refusal(where: str, holder: dict) -> UserError:
    who = (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} (`{holder.get('command')}`)"
        if holder
        else "another process"
    )
    return UserError(
        f"{where}: another `prep build-cache` is writing this cache: {who}. Wait for it to "
        "finish (or stop it), then run again; two builds of one cache would overwrite each other."
    )


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
            raise _refusal(str(self.path.parent), holder) from None
        self.stale = _read_holder(fd) or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def check(self) -> None:
        """Nothing to check: the kernel holds an flock for its process until it ends."""

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


class ObjectLock:
    """The build lock of a cache at an `s3://` URL (an object store has no `flock`): the object
    `<cache>/build.lock`, naming its holder and a token of its own.

    - Taken with a conditional create (S3's `If-None-Match: *`): of two builds, one gets it.
    - Renewed every `RENEW_S` seconds by a conditional overwrite of the version it wrote (`If-Match`): a
      holder whose lock was taken over finds out, and `check` (before the manifest is written) stops it.
    - A lock the store last saw written more than `EXPIRE_S` ago (both times by the store's clock), or
      whose holder was a process of this machine and pid namespace that has ended, was left by a build
      that was killed: it is taken over with a conditional overwrite of that version, so of two builds
      taking it over one gets it, and `stale` names the killed build.
    """

    RENEW_S = 60.0
    EXPIRE_S = 600.0

    def __init__(self, folder: CacheFolder, name: str):
        self.folder, self.name = folder, name
        self.path = folder.url(name)
        self.stale: dict | None = None
        self._body = json.dumps(dict(_holder(), token=uuid.uuid4().hex)).encode()
        self._etag = ""
        self._renewed = 0.0  # time.monotonic() of the last write that held
        self._lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> ObjectLock:
        try:
            self._take()
        except (FileNotFoundError, PermissionError) as err:
            raise UserError(
                f"{self.folder.location}: cannot write this cache ({err}); check that the bucket exists and that "
                "this machine's credentials may write it"
            ) from None
        except (ValueError, NotImplementedError) as err:  # a store that cannot create only where none exists
            raise UserError(f"{self.folder.location}: this store cannot hold a build lock ({err})") from None
        self._renewed = time.monotonic()
        self._renewer = threading.Thread(target=self._renew, name="cache-lock", daemon=True)
        self._renewer.start()
        return self

    def _take(self) -> None:
        try:
            self._etag = self.folder.publish_new(self.name, self._body)
        except FileExistsError:
            holder, etag, written = self._read()
            if not self._abandoned(holder, written):
                raise _refusal(self.folder.location, holder) from None
            taken = self.folder.replace_if(self.name, self._body, etag)
            if taken is None:
                raise _refusal(self.folder.location, self._read()[0]) from None  # another build took it first
            self._etag, self.stale = taken, holder

    def check(self) -> None:
        """Stop unless this build still holds the lock (renewed, not taken over)."""
        if self._lost or time.monotonic() - self._renewed > self.EXPIRE_S - 2 * self.RENEW_S:
            raise UserError(
                f"{self.folder.location}: this build lost its lock (it could not renew {self.path}, or another "
                "build took it over); nothing more is written. Run the same command again: it continues from the "
                "sealed shards."
            )

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is None:
            return
        self._renewer.join()
        self._renewer = None
        try:
            if not self._lost and self.folder.version(self.name)[0] == self._etag:
                self.folder.remove(self.name)  # still ours (a takeover changes the version)
        except Exception:  # noqa: BLE001 - gone, or the store unreachable: it expires; the build's own error stays
            pass

    def _renew(self) -> None:
        while not self._stop.wait(self.RENEW_S):
            try:
                renewed = self.folder.replace_if(self.name, self._body, self._etag)
                if renewed is None:
                    self._lost = True  # taken over: `check` stops this build
                    return
                self._etag = renewed
                self._renewed = time.monotonic()
            except Exception:  # noqa: BLE001 - the store unreachable for now (botocore errors are no OSError)
                pass  # the next renewal tries again; `check` stops the build if none holds for too long

    def _read(self) -> tuple[dict, str, float]:
        """The holder named by the lock, its version and when the store wrote it."""
        etag, written = self.folder.version(self.name)
        try:
            holder = json.loads((self.folder.read(self.name) or b"{}").decode())
        except (ValueError, UnicodeDecodeError):
            holder = {}
        return holder if isinstance(holder, dict) else {}, etag, written

    def _abandoned(self, holder: dict, written: float) -> bool:
        pid = holder.get("pid")
        mine = _process_identity(os.getpid())
        if mine and isinstance(pid, int) and all(holder.get(k) == mine[k] for k in ("boot_id", "pid_namespace")):
            return _process_identity(pid).get("pid_start") != holder.get("pid_start")  # ended (or a new process)
        return self._store_now() - written > self.EXPIRE_S

    def _store_now(self) -> float:
        """The store's clock: when it writes a probe object (ours may be off by minutes)."""
        probe = self.name + ".now"
        self.folder.publish(probe, b"")
        now = self.folder.version(probe)[1]
        self.folder.remove(probe)
        return now


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
