"""The cache: the only contract between `prep` (writer) and `train` (reader). See DESIGN.md.

```
<cache>/cache.json         format_version, flavour, fingerprint, counts, created
<cache>/manifest.parquet   one row per sample (written last, atomically)
<cache>/shards/000000.tar  webdataset tars; one record per sample, key = sample_id
```

A record has three members: `<id>.latents.safetensors`, `<id>.embeds.safetensors`, `<id>.json`.
Tensors are stored with safetensors (loading runs no code), in bf16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shared.errors import UserError

FORMAT_VERSION = 1
CACHE_JSON = "cache.json"
MANIFEST = "manifest.parquet"
SHARDS_DIR = "shards"
MEMBERS = ("latents.safetensors", "embeds.safetensors", "json")
STORAGE_DTYPE = torch.bfloat16

MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset_id", pa.string()),
        ("relpath", pa.string()),
        ("split", pa.string()),  # "train" or "eval"
        ("shard", pa.string()),  # path relative to the cache dir
        *[
            (f"{m.split('.')[0]}_{k}", t)
            for m in MEMBERS
            for k, t in (("offset", pa.int64()), ("size", pa.int64()), ("sha256", pa.string()))
        ],
        ("height", pa.int32()),  # target pixels
        ("width", pa.int32()),
        ("original_size", pa.list_(pa.int32())),  # [width, height] of the edit image file, upright
        ("crop_box", pa.list_(pa.int32())),  # [left, top, right, bottom] of the target in its scaled image
        ("ref_sizes", pa.list_(pa.list_(pa.int32()))),  # [[height, width] per reference], VAE pixels
        ("ref_crop_boxes", pa.list_(pa.list_(pa.int32()))),  # per reference: the box (strict) or [] (loose)
        ("prompt_lens", pa.list_(pa.int32())),  # tokens per cached caption embedding
        ("captions", pa.list_(pa.string())),
        ("source_sha256", pa.string()),  # over the image, references and caption source
    ]
)


def member_column(member: str, what: str) -> str:
    """Manifest column of a member's offset/size/sha256, e.g. ('latents.safetensors', 'offset') -> 'latents_offset'."""
    return f"{member.split('.')[0]}_{what}"


def latents_to_bytes(target: torch.Tensor, references: list[torch.Tensor]) -> bytes:
    """target [C, H/s, W/s] and each reference [C, h/s, w/s] -> safetensors bytes (bf16)."""
    tensors = {"target": target}
    tensors.update({f"ref.{i}": r for i, r in enumerate(references)})
    return save_safetensors({k: v.to(STORAGE_DTYPE).contiguous().cpu() for k, v in tensors.items()})


def latents_from_bytes(data: bytes) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Inverse of `latents_to_bytes`: (target [C, H, W], [reference [C, h, w], ...])."""
    tensors = load_safetensors(data)
    n_refs = sum(1 for k in tensors if k.startswith("ref."))
    return tensors["target"], [tensors[f"ref.{i}"] for i in range(n_refs)]


def embeds_to_bytes(prompts: list[torch.Tensor], extra: dict[str, torch.Tensor] | None = None) -> bytes:
    """Each caption's embedding [L, D] as `prompt.<i>`, plus optional `dropout` / `negative` -> bytes."""
    tensors = {f"prompt.{i}": p for i, p in enumerate(prompts)}
    tensors.update(extra or {})
    return save_safetensors({k: v.to(STORAGE_DTYPE).contiguous().cpu() for k, v in tensors.items()})


def embeds_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of `embeds_to_bytes`: {"prompt.0": [L, D], ..., optionally "dropout", "negative"}."""
    return load_safetensors(data)


def read_member(cache_dir: Path, row: dict, member: str) -> bytes:
    """Read one member's bytes straight from its tar by the manifest's offset and size (no tar parsing)."""
    with open(cache_dir / row["shard"], "rb") as f:
        f.seek(row[member_column(member, "offset")])
        data = f.read(row[member_column(member, "size")])
    if len(data) != row[member_column(member, "size")]:
        raise UserError(
            f"{cache_dir / row['shard']}: sample {row['sample_id']} member {member} is truncated; "
            "rebuild the cache with `prep build-cache`"
        )
    return data


def write_manifest(rows: list[dict[str, Any]], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write the manifest atomically: a reader sees the old file or the new one, never half of one.

    `metadata` (the build's fingerprint) goes into the Parquet schema metadata.
    """
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    _fsync_replace(tmp, path)


def read_manifest(cache_dir: Path) -> list[dict[str, Any]]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: no manifest; build the cache first with `prep build-cache --config ...`")
    return pq.read_table(path).to_pylist()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _fsync_replace(tmp, path)


def read_cache_info(cache_dir: Path) -> dict[str, Any]:
    """Read `cache.json`, refusing caches of another format version."""
    path = Path(cache_dir) / CACHE_JSON
    if not path.is_file():
        raise UserError(f"{path}: not a cache (no cache.json); build it with `prep build-cache --config ...`")
    return parse_cache_info(path.read_text(encoding="utf-8"), str(path))


def parse_cache_info(text: str, where: str) -> dict[str, Any]:
    """The contents of a `cache.json` read from `where` (a path or URL), checked for our format version."""
    info = json.loads(text)
    if info.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{where}: cache format {info.get('format_version')}, this version reads {FORMAT_VERSION}; "
            "rebuild it with `prep build-cache --force`"
        )
    return info


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
