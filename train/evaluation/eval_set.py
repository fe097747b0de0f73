"""The eval split, read from the caches: what previews and the held-out loss run on.

The eval samples are the rows prep cached with `split = "eval"`: the whole `eval_dataset_id`
dataset, or the samples each training dataset held out (`prep/splits.py`). Each carries its
prompt embedding(s), the true-CFG negative (`validation_negative_prompt` with its references) and
its latents at the preview resolution, so nothing is encoded while training.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.compute as pc
import torch

from shared.errors import UserError
from train.loader import CacheReader, CorruptSample, Row


@dataclass
class EvalSample:
    """One cached eval sample, in CPU memory (bf16 as cached)."""

    index: int  # position in the eval split (fixes its noise, its rank and its place in the grid)
    sample_id: str
    label: str  # "<dataset id>/<relative path>"
    instruction: str  # the first caption: what the preview is asked to do
    target: torch.Tensor  # [C, H/8, W/8] the ground truth's latents
    references: list[torch.Tensor]  # each [C, h/8, w/8]
    prompt: torch.Tensor  # [L, D] the first caption's embedding
    negative: torch.Tensor  # [L', D] validation_negative_prompt's embedding

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) of the target in pixels (the VAE's factor 8)."""
        return self.target.shape[-2] * 8, self.target.shape[-1] * 8


class EvalSet:
    """The eval rows of every cache, loaded on demand (an eval dataset may be large; a preview needs few)."""

    def __init__(self, readers: list[CacheReader]):
        self.rows: list[tuple[CacheReader, Row, str, str]] = []  # (reader, row, label, instruction)
        for reader in readers:
            if not len(reader.sample_ids):
                continue
            table = reader.store.read_manifest(["sample_id", "dataset_id", "relpath", "split", "captions"])
            table = table.filter(pc.equal(table.column("split"), "eval"))
            by_id = {r["sample_id"]: r for r in table.to_pylist()}
            for i in range(len(reader.sample_ids)):
                row = reader.row(i)
                meta = by_id[row.sample_id]
                self.rows.append((reader, row, f"{meta['dataset_id']}/{meta['relpath']}", meta["captions"][0]))

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> EvalSample:
        """Eval sample `index`; a damaged record stops with the file and sample named (it is not replaceable)."""
        reader, row, label, instruction = self.rows[index]
        try:
            latents, embeds = reader.load(row)
        except CorruptSample as err:
            raise UserError(
                f"{reader.location}/{row.shard}: eval sample {row.sample_id}: {err}; run `prep verify` and rebuild "
                "the cache with `prep build-cache`"
            ) from None
        if embeds.negative is None:
            raise UserError(f"{reader.location}: eval sample {row.sample_id} has no negative embedding; rebuild it")
        return EvalSample(
            index,
            row.sample_id,
            label,
            instruction,
            latents.target,
            latents.references,
            embeds.prompts[0],
            embeds.negative,
        )

    def share(self, rank: int, world_size: int, limit: int | None = None) -> list[int]:
        """The eval indices rank `rank` handles: every `world_size`-th of the first `limit` (all: None)."""
        n = len(self) if limit is None else min(limit, len(self))
        return list(range(rank, n, world_size))
