"""The optimizer a config asks for gets the settings the config resolves (SimpleTuner's, see shared/simpletuner.py)."""

import pytest
import torch

from shared.config import TrainConfig
from train.optim import build_optimizer


def test_adamw_takes_the_resolved_betas_eps_and_weight_decay():
    config = TrainConfig(learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-6, adam_weight_decay=0.0)
    param = torch.nn.Parameter(torch.zeros(4))
    group = build_optimizer([param], config).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.9, 0.99), 1e-6, 0.0)


def test_polynomial_decays_to_lr_end_with_lr_power_as_simpletuners():
    """SimpleTuner's polynomial schedule: warm-up, then (lr - lr_end) * (1 - progress) ** lr_power + lr_end."""
    from train.optim import build_scheduler

    config = TrainConfig(learning_rate=1e-3, lr_scheduler="polynomial", lr_warmup_steps=2, lr_end=1e-5, lr_power=0.8)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(4))], config)
    scheduler = build_scheduler(optimizer, config, max_steps=12)
    rates = []
    for _ in range(12):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == [0.0, 5e-4, 1e-3]
    assert rates[7] == pytest.approx((1e-3 - 1e-5) * (1 - 5 / 10) ** 0.8 + 1e-5)
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-5)
