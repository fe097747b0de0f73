"""A training batch, and how cached samples become one: one caption (or the dropout embedding) per sample,
the references each sample trains with, prompts padded under a mask."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    target: torch.Tensor  # [B, C, H/s, W/s] clean target latents
    references: list[torch.Tensor]  # one [B, C, h/s, w/s] per reference
    prompt: torch.Tensor  # [B, L, D] VL embedding of one caption per sample
    prompt_mask: torch.Tensor | None  # [B, L] 1 = token, 0 = padding; None when nothing is padded
    sample_ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "shard: sample id: why" for each sample replaced

    def to(self, device: torch.device) -> Batch:
        mask = None if self.prompt_mask is None else self.prompt_mask.to(device)
        references = [r.to(device) for r in self.references]
        return Batch(self.target.to(device), references, self.prompt.to(device), mask, self.sample_ids, self.skipped)


def collate(loaded: list[tuple], rng: random.Random, skipped: list[str], caption_dropout: float = 0.0) -> Batch:
    """Stack (row, latents, embeddings) samples.

    Each sample takes one of its captions, picked by `rng`, or with probability `caption_dropout`
    the cached embedding of the empty instruction (which still sees the sample's references).
    Samples cached with their references alone (`conditioning_multidataset_sampling: random`) first
    pick one reference each, as SimpleTuner does; where the picked references' sizes differ (loose
    references) the whole batch takes the first sample's pick, so the batch still stacks.
    """
    n_refs = len(loaded[0][1].references)
    picks = [list(range(n_refs))] * len(loaded)  # the references each sample trains with
    if loaded[0][2].alone:
        picks = [[rng.randrange(n_refs)] for _ in loaded]
        shapes = {tuple(latents.references[p[0]].shape) for (_, latents, _), p in zip(loaded, picks, strict=True)}
        if len(shapes) > 1:
            picks = [picks[0]] * len(loaded)
    references = [[latents.references[j] for j in pick] for (_, latents, _), pick in zip(loaded, picks, strict=True)]
    prompts = []
    for (row, _, embeds), pick in zip(loaded, picks, strict=True):
        source = embeds.alone[pick[0]] if embeds.alone else embeds
        dropped = caption_dropout > 0 and rng.random() < caption_dropout
        prompts.append(source.dropout if dropped else source.prompts[rng.randrange(row.n_prompts)])
    longest = max(p.shape[0] for p in prompts)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    padded = torch.zeros(len(prompts), longest, prompts[0].shape[1], dtype=prompts[0].dtype)
    for i, p in enumerate(prompts):
        padded[i, : p.shape[0]] = p
        mask[i, : p.shape[0]] = 1
    return Batch(
        target=torch.stack([latents.target for _, latents, _ in loaded]),
        references=[torch.stack(refs) for refs in zip(*references, strict=True)],
        prompt=padded,
        prompt_mask=None if bool(mask.all()) else mask,
        sample_ids=[row.sample_id for row, _, _ in loaded],
        skipped=skipped,
    )
