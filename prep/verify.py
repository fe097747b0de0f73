"""`prep verify CACHE`: is every byte of every shard the byte the build sealed? (local dir or fsspec URL)

Full check, per shard named by the manifest (samples' records, and their dropout records in `dropout-` shards):

1. its size and whole-file sha256 against the shard table recorded when it was sealed: any
   changed, missing or extra byte (tar header, padding, data, end-of-archive blocks) shows here;
2. every tar header is walked (checksums, names, offsets) and compared with the manifest: a
   member missing, extra, renamed or moved is named (members no row names, in a shard whose bytes
   are those sealed, are records of samples removed since: a note, not damage);
3. when the shard's hash differs, each record's byte range is hashed to name the samples whose
   bytes changed (and each member's data, to say which part).

The manifest itself is checked against the sha256 the build recorded in cache.json. Damaged shards
are named in `damaged.json` in the cache, so the next `prep build-cache` encodes their samples
again. Shards in `shards/` that the manifest does not name (a build killed before it switched the manifest:
the cache is still the generation the manifest names) are noted, and leave the cache intact. `--quick` checks only
that every shard exists with its recorded size.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.cache import (
    DAMAGED,
    DROPOUT,
    DROPOUT_SHARD,
    MANIFEST,
    MEMBERS,
    CacheStore,
    manifest_metadata,
    member_column,
)

REBUILD = "run `prep build-cache` again to re-encode the samples named"


@dataclass(frozen=True)
class RecordKind:
    """Where the manifest puts one kind of record: the column naming its shard, its members, and the
    columns of its byte range and sha256 (a dropout record: its one member's data)."""

    shard: str
    members: tuple[str, ...]
    record: tuple[str, str, str]  # offset, size, sha256


SAMPLE_RECORDS = RecordKind("shard", MEMBERS, ("record_offset", "record_size", "record_sha256"))
DROPOUT_RECORDS = RecordKind(
    DROPOUT_SHARD, (DROPOUT,), tuple(member_column(DROPOUT, k) for k in ("offset", "size", "sha256"))
)


@dataclass
class VerifyResult:
    samples: int = 0
    shards: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)  # one line each: where, what, what to do
    damaged: set[str] = field(default_factory=set)  # shards whose samples must be encoded again
    notes: list[str] = field(default_factory=list)  # what is worth knowing but leaves the cache intact

    @property
    def intact(self) -> bool:
        return not self.problems


def verify_cache(location: str, quick: bool = False) -> VerifyResult:
    """Check the cache at `location` (a dir or URL) byte for byte, or only sizes when `quick`."""
    store = CacheStore(location)
    info = store.read_info()
    manifest = store.read_manifest()
    meta = manifest_metadata(manifest.schema)
    result = VerifyResult(samples=manifest.num_rows)
    if not store.manifest_as_written(info):
        result.problems.append(
            f"{store.url(MANIFEST)}: differs from the manifest the build wrote (sha256 recorded in cache.json); "
            "run `prep build-cache` again: it encodes every sample again"
        )
    if meta["fingerprint"] != info["fingerprint"]["sha256"]:
        result.problems.append(
            f"{store.location}: cache.json and {MANIFEST} disagree on the fingerprint (a build was cut short); "
            "run `prep build-cache` again"
        )
    kinds = [SAMPLE_RECORDS] + ([DROPOUT_RECORDS] if DROPOUT_SHARD in manifest.column_names else [])
    named = set()
    for kind in kinds:
        # rows with a record of this kind ("" for a dropout kept inside the embeddings member: no record)
        rows_of_kind = manifest.filter(pc.fill_null(pc.not_equal(manifest.column(kind.shard), ""), False))
        by_shard = _group_by_shard(rows_of_kind, kind.shard)
        named |= set(by_shard)
        for shard, rows in by_shard.items():
            _check_one_shard(store, shard, rows, kind, meta, quick, result)
    for extra in store.list_shards():
        if extra not in named:
            result.notes.append(
                f"note: {store.url(extra)}: shard not in the manifest (left by a cut-short build; no reader opens "
                "it); `prep build-cache` reuses or removes it"
            )
    record_damage(store, result.damaged)
    return result


def _check_one_shard(
    store: CacheStore, shard: str, rows: pa.Table, kind: RecordKind, meta: dict, quick: bool, result: VerifyResult
) -> None:
    """Size, and unless `quick` every byte, of one shard holding `rows`' records of `kind`."""
    result.shards += 1
    found = len(result.problems)
    recorded = meta["shards"].get(shard)
    if recorded is None:
        result.problems.append(f"{store.url(shard)}: no size or sha256 recorded for it in the manifest; {REBUILD}")
        result.damaged.add(shard)
        return
    size = store.shard_size(shard)
    if size is None:
        result.problems.append(f"{store.url(shard)}: missing ({rows.num_rows} samples: {_names(rows)}); {REBUILD}")
    elif size != recorded["bytes"]:
        what = "truncated" if size < recorded["bytes"] else f"{size - recorded['bytes']} extra bytes"
        result.problems.append(
            f"{store.url(shard)}: {size} bytes, {recorded['bytes']} when sealed ({what}); "
            f"{_affected(rows, size, kind)}; {REBUILD}"
        )
    elif not quick:
        result.bytes_checked += size
        try:
            problems, notes = _check_shard(store, shard, rows, recorded["sha256"], kind)
            result.problems += problems
            result.notes += notes
        except OSError as err:  # a read failing past fsspec's retries, or the shard changing under us
            result.problems.append(f"{store.url(shard)}: cannot be read ({err}); check access and run again")
            return
    if len(result.problems) > found:
        result.damaged.add(shard)


def record_damage(store: CacheStore, damaged: set[str]) -> None:
    """Leave the damaged shards' names in the cache (`damaged.json`) for the next `prep build-cache`, which
    encodes their samples again (it checks only sizes itself: hashing every shard on each build would not
    scale). Best effort: a cache this process cannot write still gets the report on the screen."""
    if not damaged:
        return
    try:
        store.write_file(DAMAGED, json.dumps({"shards": sorted(damaged)}).encode())
    except OSError:
        pass


def _group_by_shard(manifest: pa.Table, column: str) -> dict[str, pa.Table]:
    """Shard name (in `column`) -> its rows, in name order (one sort, not one pass over the manifest per shard)."""
    encoded = pc.dictionary_encode(manifest.column(column)).combine_chunks()
    names, codes = encoded.dictionary.to_pylist(), encoded.indices.to_numpy()
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    return {names[k]: manifest.take(order[bounds[k] : bounds[k + 1]]) for k in np.argsort(names, kind="stable")}


def _check_shard(
    store: CacheStore, shard: str, rows: pa.Table, sha256: str, kind: RecordKind
) -> tuple[list[str], list[str]]:
    """(problems, notes) of one shard of the recorded size: whole-file hash, tar headers, then which records
    changed. Members no row names, in a shard whose bytes are those sealed, are a note: records of samples
    removed or encoded again since, which no reader opens."""
    digest = hashlib.sha256()
    with store.open_shard(shard) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    problems, extra = _walk_headers(store, shard, rows, kind.members)
    intact = digest.hexdigest() == sha256
    if extra and intact:
        notes = [
            f"note: {store.url(shard)}: {len(extra)} member(s) of records no sample uses any more (e.g. '{extra[0]}')"
        ]
        return problems, notes
    problems += [f"{store.url(shard)}: extra tar member '{name}'; {REBUILD}" for name in extra]
    if not intact:
        changed = _changed_records(store, shard, rows, kind)
        where = f"samples whose bytes changed: {', '.join(changed)}" if changed else "outside every record"
        problems.append(f"{store.url(shard)}: sha256 differs from the one recorded when sealed; {where}; {REBUILD}")
    return problems, []


def _walk_headers(
    store: CacheStore, shard: str, rows: pa.Table, members: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """Read every tar header and compare member names and data offsets with the manifest: (problems, the
    names of members no row names)."""
    expected = {}
    for row in rows.select(["sample_id", *[member_column(m, "offset") for m in members]]).to_pylist():
        for m in members:
            expected[f"{row['sample_id']}.{m}"] = row[member_column(m, "offset")]
    problems, seen, extra = [], set(), []
    try:
        with store.open_shard(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                seen.add(member.name)
                if member.name not in expected:
                    extra.append(member.name)
                elif member.offset_data != expected[member.name]:
                    problems.append(
                        f"{store.url(shard)}: member '{member.name}' at byte {member.offset_data}, the manifest says "
                        f"{expected[member.name]}; {REBUILD}"
                    )
    except tarfile.TarError as err:
        after = sorted(seen)[-1] if seen else "the start"
        problems.append(f"{store.url(shard)}: tar header unreadable after {after} ({err}); {REBUILD}")
        return problems, extra
    missing = sorted(set(expected) - seen, key=expected.get)
    if missing and all(expected[name] < expected[missing[0]] for name in seen if name in expected):
        # A tar reader stops at the first header it cannot read, so everything after it is lost to it.
        problems.append(
            f"{store.url(shard)}: tar reading stops at the header of '{missing[0]}' (before byte "
            f"{expected[missing[0]]}): damaged; readers see none of the {len(missing)} members from there on; "
            f"{REBUILD}"
        )
    elif missing:
        problems.append(f"{store.url(shard)}: tar members missing: {', '.join(missing[:5])}; {REBUILD}")
    return problems, extra


def _changed_records(store: CacheStore, shard: str, rows: pa.Table, kind: RecordKind) -> list[str]:
    """'sample (relpath): member[s]' for each record whose bytes no longer hash to the manifest's."""
    offset_column, size_column, sha_column = kind.record
    columns = ["sample_id", "relpath", *kind.record]
    columns += [member_column(m, k) for m in kind.members for k in ("offset", "size", "sha256")]
    changed = []
    for row in rows.select(list(dict.fromkeys(columns))).to_pylist():
        start = row[offset_column]
        data = store.read_range(shard, start, start + row[size_column])
        if hashlib.sha256(data).digest() == row[sha_column]:
            continue
        parts = []
        for m in kind.members:
            offset = row[member_column(m, "offset")] - start
            if (
                hashlib.sha256(data[offset : offset + row[member_column(m, "size")]]).digest()
                != row[member_column(m, "sha256")]
            ):
                parts.append(m)
        changed.append(f"{row['sample_id']} ({row['relpath']}): {', '.join(parts) or 'tar header or padding'}")
    return changed


def _affected(rows: pa.Table, size: int, kind: RecordKind) -> str:
    """The samples whose records reach past `size` bytes (the ones a truncation lost)."""
    ends = pc.add(rows.column(kind.record[0]), rows.column(kind.record[1]))
    lost = rows.filter(pc.greater(ends, size))
    return f"samples past the end: {_names(lost)}" if lost.num_rows else "every record is complete"


def _names(rows: pa.Table, limit: int = 5) -> str:
    ids, paths = rows.column("sample_id").to_pylist()[:limit], rows.column("relpath").to_pylist()[:limit]
    items = [f"{i} ({p})" for i, p in zip(ids, paths, strict=True)]
    return ", ".join(items) + (f" and {rows.num_rows - limit} more" if rows.num_rows > limit else "")
