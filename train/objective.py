"""Flow matching as the official models train: x_t = (1-σ)·x0 + σ·ε, the model predicts ε - x0."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from shared.config import TrainConfig
from train.batch import Batch
from train.packing import pack_latents, token_grid
from train.rollout import ScheduledSampling


@dataclass(frozen=True)
class SigmaSchedule:
    """How σ is drawn per sample: the density, then a shift towards noise.

    Static shift s: σ' = s·σ / (1 + (s-1)·σ). Auto shift (`flow_schedule_auto_shift`): the
    model scheduler's resolution-dependent exponential shift, μ interpolated linearly in the
    number of image tokens from `base_shift` at `base_seq_len` to `max_shift` at `max_seq_len`,
    σ' = e^μ / (e^μ + 1/σ - 1), as the pipelines shift their inference schedule.
    """

    uniform: bool = False
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    auto_shift: bool = False
    base_seq_len: int = 256
    max_seq_len: int = 8192
    base_shift: float = 0.5
    max_shift: float = 0.9
    weighting: str = "none"

    @classmethod
    def from_config(cls, config: TrainConfig, scheduler_config: dict) -> SigmaSchedule:
        return cls(
            uniform=config.flow_use_uniform_schedule,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            shift=config.flow_schedule_shift,
            auto_shift=config.flow_schedule_auto_shift,
            base_seq_len=scheduler_config.get("base_image_seq_len", 256),
            max_seq_len=scheduler_config.get("max_image_seq_len", 8192),
            base_shift=scheduler_config.get("base_shift", 0.5),
            max_shift=scheduler_config.get("max_shift", 0.9),
            weighting=config.loss_weighting,
        )

    def sample(self, batch_size: int, image_tokens: int, generator: torch.Generator, device) -> torch.Tensor:
        """σ in (0, 1) per sample [B] for targets of `image_tokens` packed tokens."""
        if self.uniform:
            sigma = torch.rand(batch_size, generator=generator, device=device)
        else:
            u = torch.randn(batch_size, generator=generator, device=device) * self.logit_std + self.logit_mean
            sigma = torch.sigmoid(u)
        return self._shift(sigma, image_tokens)

    def quantiles(self, n: int, image_tokens: int) -> torch.Tensor:
        """The σ at the n quantiles (i + ½)/n of this density [n], ascending: the held-out loss's fixed σ values,
        so it averages over the training distribution (a midpoint rule) without drawing anything."""
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        sigma = q if self.uniform else torch.sigmoid(torch.special.ndtri(q) * self.logit_std + self.logit_mean)
        return self._shift(sigma, image_tokens).float()  # the shifts are monotone: quantiles stay quantiles

    def _shift(self, sigma: torch.Tensor, image_tokens: int) -> torch.Tensor:
        if self.auto_shift:
            slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
            mu = self.base_shift + slope * (image_tokens - self.base_seq_len)
            return math.exp(mu) / (math.exp(mu) + (1 / sigma.clamp_min(1e-6) - 1))
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weight [B] (as diffusers' `compute_loss_weighting_for_sd3`)."""
        if self.weighting == "sigma_sqrt":
            return sigma.clamp_min(1e-4) ** -2.0
        if self.weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
        return torch.ones_like(sigma)


def flow_matching_loss(
    transformer: torch.nn.Module,
    batch: Batch,
    schedule: SigmaSchedule,
    generator: torch.Generator,
    rollout: ScheduledSampling | None = None,
    step: int = 0,
) -> torch.Tensor:
    """Weighted mean squared error of the velocity prediction, on the target tokens only (σ and noise drawn).
    With `rollout` (scheduled sampling, train/rollout.py), planned samples first roll their inputs out with the
    model's own predictions (`step`: optimizer steps done, for its probability ramp)."""
    b, c, h, w = batch.target.shape
    noise = torch.randn((b, (h // 2) * (w // 2), 4 * c), generator=generator, device=batch.target.device)
    sigma = schedule.sample(b, noise.shape[1], generator, noise.device)  # [B]
    if rollout is None:
        return (schedule.loss_weight(sigma) * velocity_errors(transformer, batch, sigma, noise)).mean()
    x0 = pack_latents(batch.target.float())  # [B, N, 4C]
    plan = rollout.plan(sigma, step, generator)
    rolled = rollout.roll_out(functools.partial(sample_velocity, transformer, batch), x0, noise, sigma, plan)
    prediction = predict_velocity(transformer, batch, rolled.noisy, rolled.timestep)
    return (schedule.loss_weight(sigma) * rollout.errors(prediction, x0, noise, rolled)).mean()  # the drawn σ


def velocity_errors(
    transformer: torch.nn.Module, batch: Batch, sigma: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Per-sample mean squared error [B] of the predicted velocity at noise levels `sigma` [B] with `noise`
    [B, N, 4C] (packed like the target's N tokens)."""
    x0 = pack_latents(batch.target.float())  # [B, N, 4C]; N = (H/2)·(W/2) latent 2x2 patches
    s = sigma.view(-1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    prediction = predict_velocity(transformer, batch, noisy, sigma)
    return ((prediction.float() - (noise - x0)) ** 2).mean(dim=(1, 2))  # [B]


def predict_velocity(
    transformer: torch.nn.Module, batch: Batch, noisy: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """The model's velocity [B, N, 4C] for the target tokens `noisy` [B, N, 4C] at `timestep` [B] (t/1000 = σ),
    with the batch's references and prompts."""
    references = [pack_latents(r.float()) for r in batch.references]  # each [B, N_r, 4C]
    # Target tokens first, then each reference's, as the pipelines concatenate them at inference.
    grids = [token_grid(*batch.target.shape[-2:])] + [token_grid(*r.shape[-2:]) for r in batch.references]
    prediction = transformer(
        # bf16 like the frozen base weights; under autocast the first layer casts to bf16 anyway.
        hidden_states=torch.cat([noisy, *references], dim=1).to(torch.bfloat16),
        encoder_hidden_states=batch.prompt.to(torch.bfloat16),  # [B, L, D]
        encoder_hidden_states_mask=batch.prompt_mask,
        timestep=timestep,  # the pipelines pass t/1000 = σ
        img_shapes=[grids] * noisy.shape[0],
        return_dict=False,
    )[0]
    return prediction[:, : noisy.shape[1]]  # drop the reference tokens' outputs


def sample_velocity(
    transformer: torch.nn.Module, batch: Batch, index: int, noisy: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """`predict_velocity` for sample `index` of `batch` alone (the rollout walks one sample at a time)."""
    mask = None if batch.prompt_mask is None else batch.prompt_mask[index : index + 1]
    one = Batch(
        batch.target[index : index + 1],
        [r[index : index + 1] for r in batch.references],
        batch.prompt[index : index + 1],
        mask,
    )
    return predict_velocity(transformer, one, noisy, timestep)
