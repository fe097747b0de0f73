"""Which fused attention kernel every SDPA call of the transformer uses."""

from __future__ import annotations

from contextlib import nullcontext


def attention_backends(enabled: bool):
    """Prefer cuDNN's fused attention, then flash attention, for every SDPA call in this context; a
    no-op context when not `enabled`. (On an H100 it changed nothing measurable: bench/RESULTS.md.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not enabled:
        return nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)
