"""`prep verify CACHE`: check every member of every record against the manifest's sizes and sha256."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from prep.writer import manifest_fingerprint
from shared.cache_format import MANIFEST, MEMBERS, SHARDS_DIR, member_column, read_cache_info, read_manifest


@dataclass
class VerifyResult:
    samples: int = 0
    members: int = 0
    problems: list[str] = field(default_factory=list)  # one line each: where, what, what to do

    @property
    def intact(self) -> bool:
        return not self.problems


def verify_cache(cache_dir: Path) -> VerifyResult:
    """Read every member by the manifest's offset and size and compare its sha256."""
    info = read_cache_info(cache_dir)
    rows = read_manifest(cache_dir)
    result = VerifyResult(samples=len(rows))
    if manifest_fingerprint(cache_dir / MANIFEST) != info["fingerprint"]["sha256"]:
        result.problems.append(
            f"{cache_dir}: cache.json and manifest.parquet disagree on the fingerprint (a build was cut short); "
            "run `prep build-cache` again"
        )
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    rebuild = "run `prep build-cache` again to re-encode it"
    for shard, shard_rows in sorted(by_shard.items()):
        path = cache_dir / shard
        if not path.is_file():
            result.problems.append(f"{path}: missing shard ({len(shard_rows)} samples); {rebuild}")
            continue
        with open(path, "rb") as f:
            for row in shard_rows:
                for member in MEMBERS:
                    result.members += 1
                    f.seek(row[member_column(member, "offset")])
                    data = f.read(row[member_column(member, "size")])
                    if len(data) != row[member_column(member, "size")]:
                        what = "truncated"
                    elif hashlib.sha256(data).hexdigest() != row[member_column(member, "sha256")]:
                        what = "sha256 mismatch (corrupt)"
                    else:
                        continue
                    result.problems.append(
                        f"{path}: sample {row['sample_id']} ({row['relpath']}) member {member}: {what} at byte "
                        f"{row[member_column(member, 'offset')]}; {rebuild}"
                    )
    live = set(by_shard)
    for extra in sorted((cache_dir / SHARDS_DIR).glob("*.tar")):
        if f"{SHARDS_DIR}/{extra.name}" not in live:
            result.problems.append(
                f"{extra}: shard not in the manifest (left by a cut-short build); "
                "`prep build-cache` reuses or removes it"
            )
    return result
