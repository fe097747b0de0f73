"""The optimizer a config asks for gets the settings the config resolves (SimpleTuner's, see shared/simpletuner.py)."""

import torch

from shared.config import TrainConfig
from train.optim import build_optimizer


def test_adamw_takes_the_resolved_betas_eps_and_weight_decay():
    config = TrainConfig(learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-6, adam_weight_decay=0.0)
    param = torch.nn.Parameter(torch.zeros(4))
    group = build_optimizer([param], config).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.9, 0.99), 1e-6, 0.0)
