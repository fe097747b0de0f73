"""Content hashes of model files, remembered: a 16 GB text encoder is read once per machine, not per build.

A file's sha256 is kept in `~/.cache/qwen-edit-trainer/file-hashes.json` under its resolved path,
size, mtime and inode; a file changed in any of those is hashed again. The memory is only a
shortcut: if it cannot be read or written, the files are hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from shared.files import write_json_atomic


def memory_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen-edit-trainer" / "file-hashes.json"


def file_sha256s(paths: list[Path]) -> list[str]:
    """The sha256 (hex) of each file's bytes, in order; the memory is read once and written once."""
    remembered = _read()
    digests, learned = [], False
    for path in paths:
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
        if key not in remembered:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
            remembered[key], learned = digest.hexdigest(), True
        digests.append(remembered[key])
    if learned:
        try:
            memory_file().parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(memory_file(), remembered)
        except OSError:
            pass  # a read-only home: hash again next time
    return digests


def _read() -> dict[str, str]:
    try:
        remembered = json.loads(memory_file().read_text())
    except (OSError, ValueError):
        return {}
    return remembered if isinstance(remembered, dict) else {}
