"""Reading Parquet files (cache manifests, validation records, caption tables) on the calling thread only.

`pq.read_table` reads through Arrow's dataset scanner: its read-ahead tasks run on Arrow's thread pools and
can still hold the file (a Python object, for fsspec files and `BytesIO`) after the table is returned. When
one of them lets it go while the interpreter exits, that thread must take the GIL, is stopped by Python
instead, and the process aborts ("terminate called without an active exception", exit 134; apache/arrow
#34314): a command whose work had succeeded fails, now and then, on a busy machine. `ParquetFile` without
`pre_buffer` (its default reads ahead on Arrow's I/O pool) and with `use_threads=False` reads and decodes
on this thread and leaves no task behind. Our Parquet files are small (a manifest is ~100 bytes per
sample), so one thread reads them as fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def read_parquet(source: Any, columns: list[str] | None = None) -> pa.Table:
    """The Parquet file `source` (a path or an open binary file) as a table, its schema metadata kept."""
    return pq.ParquetFile(source, pre_buffer=False).read(columns=columns, use_threads=False)


def iter_parquet(source: Any, columns: list[str], rows_per_batch: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(total rows, batch) for each record batch of `columns` of the Parquet file `source`."""
    parquet = pq.ParquetFile(source, pre_buffer=False)
    for batch in parquet.iter_batches(batch_size=rows_per_batch, columns=columns, use_threads=False):
        yield parquet.metadata.num_rows, batch
