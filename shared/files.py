"""Durable local files: what the cache and checkpoints publish survives a crash or a power loss.

A rename is atomic but not durable until the directory itself is fsynced; and a file renamed
into place before its bytes reach the disk can come back empty after a power loss. So every
file we publish goes: write a temporary, fsync it, rename it, fsync the directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, path: Path) -> None:
    """Make the finished file `tmp` durable and give it its final name `path`, atomically."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a reader (or a reboot) sees the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    publish(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
