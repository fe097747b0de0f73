"""The cache's names, schema and record codecs: what every reader and writer agrees on.

The full description of the layout is the package docstring (`shared/cache/__init__.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT_VERSION = 2
CACHE_JSON = "cache.json"
MANIFEST = "manifest.parquet"
SHARDS_DIR = "shards"
VALIDATION = "validation.parquet"  # prep's per-file record of validated images (not read by train)
LOCK = "build.lock"
DAMAGED = "damaged.json"  # prep verify's findings, for the next prep build-cache: {"shards": [...]}

LATENTS, EMBEDS, META = "latents.safetensors", "embeds.safetensors", "json"
MEMBERS = (LATENTS, EMBEDS, META)  # in this order inside each record
# The optional member: train samples' empty-instruction embeddings (caption dropout), in records of their
# own in `dropout-` shards, so a later build adds them without touching a sample's main record.
DROPOUT = "dropout.safetensors"
DROPOUT_PREFIX = "dropout-"
STORAGE_DTYPE = torch.bfloat16
STORAGE_BITS = torch.int16  # the same bits as integers: equality that tells -0 from 0 and compares NaNs
# e.g. 000003.tar, rank01-000000.tar, dropout-000000.tar, rank01-dropout-000000.tar
SHARD_NAME = re.compile(r"^(?P<prefix>(?:rank\d+-)?(?:dropout-)?)(?P<number>\d{6})\.tar$")

# How a record's embeddings member stores its tensors (the manifest's `embeds_form`): every tensor
# whole, or some as the rows after the prefix they share with their group's first prompt.
EMBEDS_WHOLE, EMBEDS_SHARED_PREFIX = "whole", "shared_prefix"

SHA256 = pa.binary(32)  # digests are stored as raw bytes (32, not 64 hex characters: memory at 1M rows)


def member_column(member: str, what: str) -> str:
    """Manifest column of a member's offset/size/sha256, e.g. (LATENTS, "offset") -> "latents_offset"."""
    return f"{member.split('.')[0]}_{what}"


DROPOUT_SHARD = "dropout_shard"  # manifest column: the shard of a row's dropout record (null: none cached)
# `dropout_shard` of a train row written before dropout records existed: its embeddings member holds the dropout.
DROPOUT_INSIDE = ""
DROPOUT_COLUMNS = (DROPOUT_SHARD, *[member_column(DROPOUT, k) for k in ("offset", "size", "sha256")])


def needs_dropout(caption_dropout_probability: float) -> bool:
    """Whether training reads the dropout member: the one place that decides which optional member a run needs."""
    return caption_dropout_probability > 0


MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset_id", pa.string()),
        ("relpath", pa.string()),
        ("split", pa.string()),  # "train" or "eval"
        ("shard", pa.string()),  # "shards/NNNNNN.tar", relative to the cache dir
        # The record's whole byte range in its shard: every member's tar header, data and padding.
        ("record_offset", pa.int64()),
        ("record_size", pa.int64()),
        ("record_sha256", SHA256),
        *[(member_column(m, k), t) for m in MEMBERS for k, t in (("offset", pa.int64()), ("size", pa.int64()))],
        *[(member_column(m, "sha256"), SHA256) for m in MEMBERS],
        ("height", pa.int32()),  # target pixels
        ("width", pa.int32()),
        ("original_size", pa.list_(pa.int32())),  # [width, height] of the edit image file, upright
        ("crop_box", pa.list_(pa.int32())),  # [left, top, right, bottom] of the target in its scaled image
        ("ref_sizes", pa.list_(pa.list_(pa.int32()))),  # [[height, width] per reference], VAE pixels
        ("ref_crop_boxes", pa.list_(pa.list_(pa.int32()))),  # per reference: the box (strict) or [] (loose)
        ("prompt_lens", pa.list_(pa.int32())),  # tokens per cached caption embedding
        ("embeds_form", pa.string()),  # EMBEDS_WHOLE or EMBEDS_SHARED_PREFIX; null in caches that predate it
        # The dropout record (train rows; null where none is cached, and in caches that predate the column,
        # whose embeddings member holds the dropout itself).
        (DROPOUT_SHARD, pa.string()),
        (member_column(DROPOUT, "offset"), pa.int64()),
        (member_column(DROPOUT, "size"), pa.int64()),
        (member_column(DROPOUT, "sha256"), SHA256),
        ("captions", pa.list_(pa.string())),
        ("source_sha256", pa.string()),  # hex, over the image, references, captions and split
    ]
)

# What training reads of the manifest (the rest is for prep and people): ~150 bytes per row.
TRAIN_COLUMNS = (
    "sample_id",
    "split",
    "shard",
    *[member_column(m, k) for m in (LATENTS, EMBEDS) for k in ("offset", "size", "sha256")],
    "height",
    "width",
    "ref_sizes",
    "prompt_lens",
)


@dataclass
class Latents:
    """A record's VAE latents, bf16: the target [C, H/8, W/8] and each reference [C, h/8, w/8]."""

    target: torch.Tensor
    references: list[torch.Tensor]

    def to_bytes(self) -> bytes:
        tensors = {"target": self.target, **{f"ref.{i}": r for i, r in enumerate(self.references)}}
        return _save(tensors)

    @classmethod
    def from_bytes(cls, data: bytes) -> Latents:
        tensors = load_safetensors(data)
        n_refs = sum(1 for k in tensors if k.startswith("ref."))
        return cls(tensors["target"], [tensors[f"ref.{i}"] for i in range(n_refs)])


@dataclass
class Embeddings:
    """A record's Qwen2.5-VL embeddings, bf16, each [L, D] (L: that instruction's tokens).

    `prompts`: one per caption, encoded with all of the sample's references. `dropout`: the empty
    instruction with the references (train samples; what caption dropout trains on). `negative`: the
    previews' negative instruction with the references (eval samples). `alone` (train samples of a
    cache built with `conditioning_multidataset_sampling: random`, in place of `prompts`/`dropout`):
    per reference r, the same prompts and dropout encoded with reference r alone.
    """

    prompts: list[torch.Tensor]
    dropout: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    alone: list[Embeddings] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it holds."""
        own = [*self.prompts, *(t for t in (self.dropout, self.negative) if t is not None)]
        return own + [t for sub in self.alone or [] for t in sub.tensors()]

    def to_bytes(self) -> bytes:
        """Every tensor in one safetensors blob (the dropout included; `stored` splits it off)."""
        return _save(self._named())

    def stored(self) -> tuple[bytes, str, bytes | None]:
        """The embeddings member's bytes, its form (EMBEDS_WHOLE or EMBEDS_SHARED_PREFIX), and the dropout
        member's bytes (the `dropout` tensors; None when there are none)."""
        named = self._named()
        dropout = {name: t for name, t in named.items() if _is_dropout(name)}
        main = {name: t for name, t in named.items() if name not in dropout}
        shared = any(name.endswith(".after") for name in main)
        return _save(main), EMBEDS_SHARED_PREFIX if shared else EMBEDS_WHOLE, _save(dropout) if dropout else None

    def _named(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Stored tensors by name: each after the group's first prompt as the rows after their shared prefix."""
        own = [(f"prompt.{i}", p) for i, p in enumerate(self.prompts)]
        extra = (("dropout", self.dropout), ("negative", self.negative))
        own += [(name, value) for name, value in extra if value is not None]
        tensors: dict[str, torch.Tensor] = {}
        base = self.prompts[0].to(STORAGE_DTYPE) if self.prompts else None  # what the group's others may share
        for name, value in own:
            value = value.to(STORAGE_DTYPE)
            shared = shared_rows(base, value) if base is not None and name != "prompt.0" else 0
            if shared:
                tensors[f"{prefix}{name}.after"] = value[shared:]
                tensors[f"{prefix}{name}.shared_rows"] = torch.tensor([shared], dtype=torch.int64)
            else:
                tensors[prefix + name] = value
        for r, sub in enumerate(self.alone or []):
            tensors.update(sub._named(f"ref.{r}."))
        return tensors

    @classmethod
    def from_bytes(cls, data: bytes, dropout: bytes | None = None) -> Embeddings:
        """From an embeddings member and, if given, the sample's dropout member (whose tensors may be stored
        as the rows after the embeddings member's `prompt.0`)."""
        tensors = load_safetensors(data)
        if dropout is not None:
            tensors.update(load_safetensors(dropout))
        return cls._from_named(expand_shared_rows(tensors))

    @classmethod
    def _from_named(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> Embeddings:
        n_prompts = sum(1 for k in tensors if k.startswith(prefix + "prompt."))
        n_alone = len({k.split(".")[1] for k in tensors if k.startswith("ref.")}) if not prefix else 0
        return cls(
            [tensors[f"{prefix}prompt.{i}"] for i in range(n_prompts)],
            tensors.get(prefix + "dropout"),
            tensors.get(prefix + "negative"),
            [cls._from_named(tensors, f"ref.{r}.") for r in range(n_alone)] or None,
        )


def _is_dropout(name: str) -> bool:
    """A stored tensor name of a dropout embedding: `dropout`, `dropout.after`, `ref.1.dropout.shared_rows`, ..."""
    parts = name.split(".")
    return parts[2 if parts[0] == "ref" else 0] == "dropout"


def shared_rows(base: torch.Tensor, other: torch.Tensor) -> int:
    """How many leading rows of `other` [L, D] equal `base`'s [L', D] bit for bit (both in the storage dtype)."""
    n = min(base.shape[0], other.shape[0])
    if n == 0 or base.shape[1:] != other.shape[1:]:
        return 0
    bits = STORAGE_BITS
    equal = (base[:n].contiguous().view(bits) == other[:n].contiguous().view(bits)).all(dim=1)  # [n]
    return n if bool(equal.all()) else int(equal.int().argmin())  # the first row that differs


def expand_shared_rows(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rebuild each `NAME.after` + `NAME.shared_rows` as `NAME`: its group's first prompt's leading rows, then
    the rows stored after them."""
    out = {k: v for k, v in tensors.items() if not k.endswith((".after", ".shared_rows"))}
    for key in (k for k in tensors if k.endswith(".after")):
        name = key.removesuffix(".after")
        group = ".".join(name.split(".")[:2]) + "." if name.startswith("ref.") else ""
        shared = int(tensors[name + ".shared_rows"][0])
        out[name] = torch.cat([out[group + "prompt.0"][:shared], tensors[key]])
    return out


def _save(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors(
        {k: (v if v.dtype == torch.int64 else v.to(STORAGE_DTYPE)).contiguous().cpu() for k, v in tensors.items()}
    )
