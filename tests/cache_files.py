"""Reading a cache's files directly in tests: manifest rows as dicts, member bytes, tensors by their stored names."""

from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors

from shared.cache import DROPOUT, DROPOUT_SHARD, EMBEDS, CacheStore
from shared.cache.format import expand_shared_rows


def manifest_rows(cache) -> list[dict]:
    return CacheStore(cache).read_manifest().to_pylist()


def member_bytes(cache, row: dict, member: str) -> bytes:
    return CacheStore(cache).read_member(row, member)


def stored_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """A safetensors member by the names the format gives its tensors ("target", "ref.0", "prompt.0", ...), those
    stored as the rows after a shared prefix (`NAME.after`) rebuilt whole."""
    return expand_shared_rows(load_safetensors(data))


def sample_embeddings(cache, row: dict) -> dict[str, torch.Tensor]:
    """A row's embeddings by their names ("prompt.0", "dropout", "negative", "ref.0.dropout", ...), whole: its
    embeddings member and, where it has one, its dropout record (in a `dropout-` shard)."""
    tensors = load_safetensors(member_bytes(cache, row, EMBEDS))
    if row.get(DROPOUT_SHARD):
        tensors.update(load_safetensors(member_bytes(cache, row, DROPOUT)))
    return expand_shared_rows(tensors)
