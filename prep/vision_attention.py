"""Qwen2.5-VL's vision tower attention as one SDPA call per window size, not one per window.

The vision tower attends within windows of 8x8 patches in 28 of its 32 layers (and within each
whole image in the other 4). Without the flash-attn package, transformers runs one SDPA call per
window: a ~1 MP reference has ~100 windows, so ~3,000 small calls per image, and the GPU waits on
the host between them (measured on an H200: the vision tower made 64 TFLOP/s, 6% of the card's
bf16 peak, the slowest of the three encoders). Most windows have the same size (only those at the
image's right and bottom edges are smaller), so here the windows of each size are gathered into
one batch and attended in one call. Each window still attends only to itself, with the same SDPA
kernels, so the embeddings equal the per-window path's (tested).

Registered with transformers' `AttentionInterface` under a name containing "flash", which is what
makes transformers hand over whole sequences with their window bounds (`cu_seq_lens_q`) instead of
splitting them itself; it is set for the vision tower only (`use_grouped_window_attention`), the
language model keeps SDPA.
"""

from __future__ import annotations

import weakref

import torch
from torch.nn.functional import scaled_dot_product_attention

NAME = "flash_grouped_sdpa"
# The grouping of one bounds tensor, kept while the tensor lives: the vision tower passes the same
# tensor to each of its layers, and reading it back from the GPU is a host sync (as is copying the
# gather index there), so it is done once per forward instead of once per layer.
_GROUPS: dict[int, tuple[weakref.ref, list]] = {}  # id(bounds) -> (the tensor, its grouping)


def grouped_window_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query, key, value: [1, heads, tokens, head_dim], windows laid end to end; `cu_seq_lens_q`:
    [windows + 1] their bounds (int32). Returns the output [1, tokens, heads, head_dim]."""
    if attention_mask is not None or cu_seq_lens_q is None:
        raise ValueError("grouped window attention takes window bounds (cu_seq_lens_q) and no mask")
    heads, d = query.shape[1], query.shape[3]
    out = torch.empty_like(query)
    for count, length, index in _windows_by_length(cu_seq_lens_q):
        q, k, v = (
            t[0].index_select(1, index).view(heads, count, length, d).transpose(0, 1) for t in (query, key, value)
        )
        attended = scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)  # [count, heads, length, d]
        out[0].index_copy_(1, index, attended.transpose(0, 1).reshape(heads, count * length, d))
    return out.transpose(1, 2), None


def _windows_by_length(bounds: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """`bounds` [windows + 1] (cu_seqlens) -> per window length: (windows of it, the length, the token index
    of every position of each of those windows [windows * length], on the bounds' device)."""
    kept = _GROUPS.get(id(bounds))
    if kept is not None and kept[0]() is bounds:
        return kept[1]
    edges = bounds.tolist()
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    groups = [
        (len(starts), length, (torch.tensor(starts)[:, None] + torch.arange(length)).flatten().to(bounds.device))
        for length, starts in starts_by_length.items()
    ]
    key = id(bounds)
    _GROUPS[key] = (weakref.ref(bounds, lambda _: _GROUPS.pop(key, None)), groups)  # dropped with the tensor
    return groups


def use_grouped_window_attention(text_encoder: torch.nn.Module) -> None:
    """Run `text_encoder`'s vision tower (a Qwen2.5-VL) with `grouped_window_attention`; the rest unchanged."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, grouped_window_attention)
    text_encoder.set_attn_implementation({"vision_config": NAME})
