"""What prep already knows about each image file, so a rebuild with nothing changed decodes nothing.

For every image it validated, `build-cache` keeps a record in `<cache>/validation.parquet`: the
file's size, modification time (ns) and inode, and what decoding it found (size, conversion
notes, error) and its content sha256. A later validation trusts a record whose file still has the
same size, mtime and inode (one `stat` per file) and decodes only new or changed files.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shared.cache import VALIDATION, CacheFolder
from shared.parquet import read_parquet

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("inode", pa.int64()),
        ("max_pixels", pa.int64()),  # the guard it was checked against: a new limit means a new check
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("notes", pa.list_(pa.string())),
        ("error", pa.string()),
        ("sha256", pa.string()),
    ]
)


@dataclass
class FileRecord:
    bytes: int
    mtime_ns: int
    inode: int
    max_pixels: int
    width: int = 0  # upright, as decoded; 0 when unreadable
    height: int = 0
    notes: list[str] = field(default_factory=list)
    error: str = ""
    sha256: str = ""  # hex, of the file's bytes

    @property
    def size(self) -> tuple[int, int] | None:
        return None if self.error else (self.width, self.height)


def stat_record(path: Path, max_pixels: int) -> FileRecord:
    """A record holding only what `stat` says (the decode fills in the rest)."""
    st = path.stat()
    return FileRecord(st.st_size, st.st_mtime_ns, st.st_ino, max_pixels)


def unchanged(old: FileRecord | None, new: FileRecord) -> bool:
    return old is not None and (old.bytes, old.mtime_ns, old.inode, old.max_pixels) == (
        new.bytes,
        new.mtime_ns,
        new.inode,
        new.max_pixels,
    )


def load_records(folder: CacheFolder) -> dict[Path, FileRecord]:
    """The records a cache keeps; none when they are missing or unreadable (everything is then decoded again)."""
    data = folder.read(VALIDATION)
    if data is None:
        return {}
    try:
        table = read_parquet(io.BytesIO(data), SCHEMA.names).cast(SCHEMA)
    except (OSError, ValueError, pa.ArrowException):  # ValueError: columns missing (cast)
        return {}
    columns = [table.column(name).to_pylist() for name in SCHEMA.names]
    return {Path(values[0]): FileRecord(*values[1:]) for values in zip(*columns, strict=True)}


def save_records(folder: CacheFolder, records: dict[Path, FileRecord]) -> None:
    rows = [{"path": str(p), **asdict(r)} for p, r in sorted(records.items())]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sink)
    folder.publish(VALIDATION, sink.getvalue().to_pybytes())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
