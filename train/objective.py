"""Flow matching as the official models train: x_t = (1-σ)·x0 + σ·ε, the model predicts ε - x0."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.packing import pack_latents, token_grid
from train.loader import Batch


def sample_sigmas(
    batch_size: int,
    shift: float,
    generator: torch.Generator,
    device: torch.device,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """σ in (0, 1) per sample [B]: logit-normal, then shifted towards noise by `shift` (1 = no shift)."""
    u = torch.randn(batch_size, generator=generator, device=device) * logit_std + logit_mean
    sigma = torch.sigmoid(u)
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_matching_loss(
    transformer: torch.nn.Module, batch: Batch, shift: float, generator: torch.Generator
) -> torch.Tensor:
    """Mean squared error of the velocity prediction, on the target tokens only."""
    x0 = pack_latents(batch.target.float())  # [B, N, 4C]; N = (H/2)·(W/2) latent 2x2 patches
    references = [pack_latents(r.float()) for r in batch.references]  # each [B, N_r, 4C]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    sigma = sample_sigmas(x0.shape[0], shift, generator, x0.device)  # [B]
    s = sigma.view(-1, 1, 1)
    noisy = (1 - s) * x0 + s * noise

    # Target tokens first, then each reference's, as the pipelines concatenate them at inference.
    grids = [token_grid(*batch.target.shape[-2:])] + [token_grid(*r.shape[-2:]) for r in batch.references]
    prediction = transformer(
        # bf16 like the frozen base weights; under autocast the first layer casts to bf16 anyway.
        hidden_states=torch.cat([noisy, *references], dim=1).to(torch.bfloat16),
        encoder_hidden_states=batch.prompt.to(torch.bfloat16),  # [B, L, D]
        encoder_hidden_states_mask=batch.prompt_mask,
        timestep=sigma,  # the pipelines pass t/1000 = σ
        img_shapes=[grids] * x0.shape[0],
        return_dict=False,
    )[0]
    prediction = prediction[:, : x0.shape[1]]  # drop the reference tokens' outputs
    return F.mse_loss(prediction.float(), noise - x0)
