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

import torch
from torch.nn.functional import scaled_dot_product_attention

NAME = "flash_grouped_sdpa"


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
    bounds = cu_seq_lens_q.tolist()  # one host sync per layer, as transformers' own per-window split
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    heads, d = query.shape[1], query.shape[3]
    out = torch.empty_like(query)
    for length, starts in starts_by_length.items():
        # token index of every position of every window of this length: [windows * length]
        index = (torch.tensor(starts)[:, None] + torch.arange(length)).flatten().to(query.device)
        q, k, v = (
            t[0].index_select(1, index).view(heads, len(starts), length, d).transpose(0, 1) for t in (query, key, value)
        )
        attended = scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling
        )  # [windows, heads, length, d]
        out[0].index_copy_(1, index, attended.transpose(0, 1).reshape(heads, len(starts) * length, d))
    return out.transpose(1, 2), None


def use_grouped_window_attention(text_encoder: torch.nn.Module) -> None:
    """Run `text_encoder`'s vision tower (a Qwen2.5-VL) with `grouped_window_attention`; the rest unchanged."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, grouped_window_attention)
    text_encoder.set_attn_implementation({"vision_config": NAME})
