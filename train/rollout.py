"""Scheduled sampling ("rollout"), SimpleTuner's experimental feature, with its keys and meaning for flow models.

A model trained only on noisy inputs made from clean latents never sees its own mistakes, which
compound over the steps of sampling (exposure bias). With `scheduled_sampling_max_step_offset` > 0
some samples of a batch train on inputs the model made itself: the sample drawn at timestep t
(σ·1000, truncated) starts instead `offset` timesteps higher, at (1 - s/999)·x0 + (s/999)·ε for
s = t + offset, and the model walks it back down to t with its own velocity in Euler steps of one
timestep (1/999), without gradients. The loss then trains the model at t on that state, towards the
same target ε - x0. This is SimpleTuner 4.10's flow-matching rollout (`helpers/scheduled_sampling/`:
`build_rollout_schedule`, `_apply_flow_matching_rollout`) step for step; the model sees timestep
t/1000 at every call, as SimpleTuner's Qwen model does.

- Which samples: each with probability `scheduled_sampling_probability`, or, when
  `scheduled_sampling_ramp_steps` > 0, a probability moving from `_prob_start` to `_prob_end` over
  that many optimizer steps after `_start_step` (`_ramp_shape` linear or cosine). Offsets are drawn
  in 0..max per `_strategy`: `uniform`, `biased_early` (small ones more often), `biased_late`.
- ReflexFlow (`scheduled_sampling_reflexflow`, on unless set false, as SimpleTuner turns it on for
  flow models): each element's squared error is weighted by 1 + α·e/‖e‖₁, e the difference between
  the model's prediction at the sample's own noisy input and at the rolled-out one (α:
  `_reflexflow_alpha`); times `_reflexflow_beta2`; and β1 (`_reflexflow_beta1`) times the squared
  distance between the prediction's direction and the direction from x0 to the (rolled-out) input
  is added per sample. A sample not rolled out has e = 0 (weight 1), so its predictions are not
  computed (SimpleTuner computes them and gets the same numbers).
- `scheduled_sampling_sampler` and `_order` choose SimpleTuner's solver for ε- and v-prediction
  models only; for flow models (Qwen edit) it rolls out with Euler steps, as here.

Cost: a rolled-out sample takes `offset` extra forward passes without gradients, two more with
ReflexFlow; deciding the steps reads the plan back to the host once per micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared.config import TrainConfig

TIMESTEPS = 1000  # the models' num_train_timesteps: timesteps 0..999, state σ = t/999 in the rollout
Predict = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (sample, input [1, N, 4C], t/1000 [1])


@dataclass(frozen=True)
class RolloutPlan:
    """Per sample [B]: the timestep the loss trains at, where its rollout starts, and how many steps it takes."""

    target: torch.Tensor  # int64, σ·1000 truncated
    source: torch.Tensor  # int64, target + offset, at most 999
    offsets: torch.Tensor  # int64, 0: the sample trains on its own noisy input


@dataclass(frozen=True)
class Rolled:
    """What the rollout changed: the loss's inputs and, with ReflexFlow, what weights its errors."""

    noisy: torch.Tensor  # [B, N, 4C] the model's inputs (rolled out where offsets > 0)
    timestep: torch.Tensor  # [B] what the model is told (t/1000)
    exposure: torch.Tensor | None  # [B, N, 4C] prediction at its own input minus at the rolled-out one


@dataclass(frozen=True)
class ScheduledSampling:
    max_step_offset: int
    probability: float
    prob_start: float
    prob_end: float
    ramp_steps: int
    start_step: int
    ramp_shape: str
    strategy: str
    reflexflow: bool
    alpha: float
    beta1: float
    beta2: float

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> ScheduledSampling | None:
        """None when scheduled sampling is off (`scheduled_sampling_max_step_offset` 0)."""
        if cfg.scheduled_sampling_max_step_offset <= 0:
            return None
        p = cfg.scheduled_sampling_probability
        return cls(
            max_step_offset=cfg.scheduled_sampling_max_step_offset,
            probability=p,
            # SimpleTuner reads `prob_start or probability`: an unset (0) start means the probability
            prob_start=cfg.scheduled_sampling_prob_start or p,
            prob_end=cfg.scheduled_sampling_prob_end or p,
            ramp_steps=cfg.scheduled_sampling_ramp_steps,
            start_step=cfg.scheduled_sampling_start_step,
            ramp_shape=cfg.scheduled_sampling_ramp_shape,
            strategy=cfg.scheduled_sampling_strategy,
            reflexflow=cfg.scheduled_sampling_reflexflow,
            alpha=cfg.scheduled_sampling_reflexflow_alpha,
            beta1=cfg.scheduled_sampling_reflexflow_beta1,
            beta2=cfg.scheduled_sampling_reflexflow_beta2,
        )

    def describe(self) -> str:
        """What the run does, said at its start (with what SimpleTuner's defaults may not make obvious)."""
        chance = f"probability {self.probability:g}"
        if self.ramp_steps > 0:
            chance = (
                f"probability {self.prob_start:g} -> {self.prob_end:g} over {self.ramp_steps} steps from step "
                f"{self.start_step} ({self.ramp_shape})"
            )
        reflex = f"ReflexFlow on (alpha {self.alpha:g}, beta1 {self.beta1:g}, beta2 {self.beta2:g})"
        line = (
            f"scheduled sampling: offsets up to {self.max_step_offset} timesteps ({self.strategy}), {chance}; "
            f"{reflex if self.reflexflow else 'ReflexFlow off'}; a rolled-out sample costs up to "
            f"{self.max_step_offset + 2 * self.reflexflow} extra forward passes without gradients; the rolled-out "
            "state is float32 (SimpleTuner keeps it in bf16, where most steps of 1/999 of the velocity round away)"
        )
        most = max(self.prob_start, self.prob_end) if self.ramp_steps > 0 else self.probability
        if most == 0.0:
            line += (
                "\nWARNING: scheduled_sampling_probability is 0 (SimpleTuner's default): no sample is rolled out"
                + (
                    f", but ReflexFlow's direction term (x{self.beta1:g}) still joins every loss"
                    if self.reflexflow
                    else ""
                )
                + "; set scheduled_sampling_probability (or a ramp) to roll samples out"
            )
        return line

    def probability_at(self, step: int) -> float:
        """The chance a sample is rolled out at optimizer step `step` (steps done so far)."""
        if self.ramp_steps <= 0:
            return self.probability
        if step < self.start_step:
            return self.prob_start
        progress = min(1.0, max(0.0, (step - self.start_step) / self.ramp_steps))
        if self.ramp_shape == "cosine":
            progress = 0.5 - 0.5 * math.cos(math.pi * progress)
        return self.prob_start + (self.prob_end - self.prob_start) * progress

    def plan(self, sigma: torch.Tensor, step: int, generator: torch.Generator) -> RolloutPlan:
        """Draw the plan for σ [B] (SimpleTuner's `build_rollout_schedule`, its draws in its order)."""
        target = (sigma * TIMESTEPS).long()  # SimpleTuner's flow timesteps are σ·1000; the plan truncates them
        b, device = target.shape[0], target.device
        p = self.probability_at(step)
        if p < 1.0:
            chosen = torch.bernoulli(torch.full((b,), p, device=device), generator=generator).bool()
        else:
            chosen = torch.ones(b, dtype=torch.bool, device=device)
        if self.strategy == "uniform":
            offsets = torch.randint(0, self.max_step_offset + 1, (b,), device=device, generator=generator)
        else:
            u = torch.rand((b,), device=device, generator=generator) ** 2
            u = u if self.strategy == "biased_early" else 1.0 - u
            offsets = torch.round(u * self.max_step_offset).long()
        offsets = offsets * chosen
        source = torch.clamp(target + offsets, max=TIMESTEPS - 1)
        return RolloutPlan(target, source, offsets)

    @torch.no_grad()
    def roll_out(
        self, predict: Predict, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, plan: RolloutPlan
    ) -> Rolled:
        """Walk the planned samples down from their source timestep with the model's own velocity.

        `predict(i, inputs [1, N, 4C], timestep [1])` is the model's velocity for sample i; x0, noise
        [B, N, 4C] float32; σ [B] the drawn noise levels (kept for samples not rolled out).
        """
        s = sigma.view(-1, 1, 1)
        noisy = (1 - s) * x0 + s * noise  # [B, N, 4C]
        timestep = sigma.clone()
        exposure = torch.zeros_like(x0) if self.reflexflow else None
        denominator = float(TIMESTEPS - 1)
        rows = zip(plan.offsets.tolist(), plan.source.tolist(), plan.target.tolist(), strict=True)  # one host sync
        for i, (offset, source, target) in enumerate(rows):
            if offset <= 0 or source <= target:
                continue
            clean = predict(i, noisy[i : i + 1], timestep[i : i + 1]) if self.reflexflow else None
            current = (1 - source / denominator) * x0[i : i + 1] + (source / denominator) * noise[i : i + 1]
            for t in range(source, target, -1):  # one Euler step per timestep, t -> t - 1
                velocity = predict(i, current, torch.full((1,), t / TIMESTEPS, device=x0.device))
                current = current + ((t - 1) / denominator - t / denominator) * velocity.float()
            noisy[i] = current[0]
            timestep[i] = target / TIMESTEPS
            if exposure is not None:
                exposure[i] = (clean.float() - predict(i, current, timestep[i : i + 1]).float())[0]
        return Rolled(noisy, timestep, exposure)

    def errors(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, rolled: Rolled) -> torch.Tensor:
        """Per-sample loss [B]: the squared velocity error, ReflexFlow-weighted, plus its direction term."""
        errors = (prediction.float() - (noise - x0)) ** 2  # [B, N, 4C]
        if not self.reflexflow:
            return errors.mean(dim=(1, 2))
        if self.alpha != 0.0:
            norm = rolled.exposure.abs().sum(dim=(1, 2), keepdim=True).clamp_min(1e-6)
            errors = errors * (1.0 + self.alpha * rolled.exposure / norm)
        errors = errors * self.beta2
        per_sample = errors.mean(dim=(1, 2))
        if self.beta1 != 0.0:  # ADR: the prediction's direction against the path from x0 to the input
            target = torch.nn.functional.normalize((rolled.noisy - x0).flatten(1), dim=1, eps=1e-6)
            predicted = torch.nn.functional.normalize(prediction.float().flatten(1), dim=1, eps=1e-6)
            per_sample = per_sample + self.beta1 * (predicted - target).pow(2).sum(dim=1)
        return per_sample
