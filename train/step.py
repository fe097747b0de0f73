"""One optimizer step, the whole of it on one screen: micro-batches, loss, backward, the finite check,
clipping, the update (skipped on the device when not finite), the schedule."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from shared.config import TrainConfig
from train.attention import attention_backends
from train.batch import Batch
from train.objective import SigmaSchedule, flow_matching_loss
from train.optim import skips_on_device
from train.rollout import ScheduledSampling


class StepResult(NamedTuple):
    """One optimizer step, as 0-dim device tensors (reading them is a host sync: the metrics do, rarely)."""

    loss: torch.Tensor  # mean over micro-batches and processes
    grad_norm: torch.Tensor  # of all LoRA gradients, before clipping
    skipped: torch.Tensor  # 1.0 when the loss or the gradient was not finite: the update was not applied


def optimizer_step(
    accelerator,
    transformer: torch.nn.Module,
    optimizer,
    scheduler,
    params: dict[str, torch.nn.Parameter],
    batches: Iterator[Batch],
    schedule: SigmaSchedule,
    noise: torch.Generator,
    cfg: TrainConfig,
    rollout: ScheduledSampling | None = None,
    step: int = 0,
) -> StepResult:
    """One optimizer step over `gradient_accumulation_steps` micro-batches, with no host sync (but for scheduled
    sampling's plan: `rollout`, at optimizer step `step`; train/rollout.py).

    Every rank runs backward even on a non-finite loss (DDP's gradient all-reduce must match). The
    loss is averaged over ranks and the gradients are all-reduced, so every rank computes the same
    skip flag; the fused AdamW then applies or skips the update on the device. The schedule steps
    either way (as with AMP's GradScaler), so a skipped step still counts as a step.
    """
    total = torch.zeros((), device=accelerator.device)
    for _ in range(cfg.gradient_accumulation_steps):
        batch = next(batches).to(accelerator.device)
        attention = attention_backends(cfg.prefer_cudnn_attention)
        with accelerator.accumulate(transformer), accelerator.autocast(), attention:
            loss = flow_matching_loss(transformer, batch, schedule, noise, rollout, step)
            accelerator.backward(loss)
        total += loss.detach().float() / cfg.gradient_accumulation_steps
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "mean")
    grad_norm = clip_gradients(accelerator, params, cfg)
    skipped = (~(torch.isfinite(total) & torch.isfinite(grad_norm))).float()
    inner = optimizer.optimizer  # accelerate's wrapper holds the torch optimizer
    if skips_on_device(inner):
        inner.found_inf = skipped
        optimizer.step()
    elif not skipped.item():  # an optimizer that cannot skip on the device: one sync per step
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total, grad_norm.float(), skipped)


def clip_gradients(accelerator, params: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> torch.Tensor:
    """Clip the LoRA gradients as `grad_clip_method` says (none when `max_grad_norm` is 0); return their norm
    before clipping (a 0-dim device tensor)."""
    if cfg.max_grad_norm > 0 and cfg.grad_clip_method == "norm":
        return accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params.values() if p.grad is not None])
    if cfg.max_grad_norm > 0:
        accelerator.clip_grad_value_(list(params.values()), cfg.max_grad_norm)
    return grad_norm
