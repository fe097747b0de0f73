"""Latent packing: 2x2 latent patches become one transformer token, as in diffusers' Qwen-Image pipelines."""

from __future__ import annotations

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, (H/2)*(W/2), 4C] tokens (H and W even).

    The channel order inside a token is (C, 2, 2), the same as `QwenImageEditPipeline._pack_latents`.
    """
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/2)*(W/2), 4C] tokens -> [B, C, H, W] latents; `height`/`width` are latent (not pixel) sizes."""
    b, _, c4 = tokens.shape
    tokens = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2)
    tokens = tokens.permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, c4 // 4, height, width)


def token_grid(latent_height: int, latent_width: int) -> tuple[int, int, int]:
    """The (frames, rows, cols) entry of `img_shapes` for a latent of this size."""
    return (1, latent_height // 2, latent_width // 2)
