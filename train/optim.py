"""The optimizer and the learning-rate schedule a config asks for."""

from __future__ import annotations

import torch
from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

from shared.config import TrainConfig
from shared.errors import UserError


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (`optimizer: bnb-adamw8bit`) when it is installed.

    torch's AdamW is the fused one: one kernel for all parameters, and it skips a step on the device
    when `optimizer.found_inf` is 1 (as AMP's GradScaler uses it), so a non-finite loss needs no host sync.
    """
    kwargs = dict(
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    if config.optimizer == "bnb-adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(
                "optimizer 'bnb-adamw8bit' needs bitsandbytes (pip install bitsandbytes, CUDA only); "
                "or set optimizer to 'adamw'"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=True, **kwargs)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` honours `found_inf` (torch's fused AdamW); otherwise the loop syncs to skip."""
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, max_steps: int):
    """constant, constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial (to `lr_end`, with
    `lr_power`, as SimpleTuner's), with `lr_warmup_steps` of linear warm-up.

    Counted in optimizer steps whatever the number of processes: the loop steps it once per optimizer
    step itself (it is not handed to accelerate, which would step it once per process), so a run
    resumed on another number of GPUs continues the schedule at the same learning rate.
    """
    if config.lr_scheduler in ("cosine", "polynomial") and config.lr_warmup_steps >= max_steps:
        raise UserError(
            f"lr_warmup_steps ({config.lr_warmup_steps}) must be below the number of training steps ({max_steps}) "
            f"for the {config.lr_scheduler} schedule to decay"
        )
    if config.lr_scheduler == "polynomial":
        if not config.lr_end < config.learning_rate:
            raise UserError(
                f"lr_end ({config.lr_end}) must be below learning_rate ({config.learning_rate}) for the polynomial "
                "schedule to decay to it"
            )
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, config.lr_warmup_steps, max_steps, lr_end=config.lr_end, power=config.lr_power
        )
    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max_steps,
    )


def apply_resumed_settings(optimizer: torch.optim.Optimizer, scheduler, config: TrainConfig) -> None:
    """After a resume, the config's learning rate, betas, epsilon and weight decay replace those the
    checkpoint's optimizer and schedule saved (a loaded state keeps the saved ones); the schedule keeps its
    position, its shape is already the config's (`lr_scheduler`, `lr_warmup_steps`)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate may wrap it
    for group in optimizer.param_groups:
        group.update(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
        group.update(weight_decay=config.adam_weight_decay, initial_lr=config.learning_rate)
    inner.base_lrs = [config.learning_rate for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, inner.lr_lambdas, strict=True):
        group["lr"] = config.learning_rate * factor(inner.last_epoch)
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]
