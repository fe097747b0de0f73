"""Gradient clipping as `grad_clip_method` says, with `max_grad_norm` as SimpleTuner's threshold."""

import pytest
import torch
from accelerate import Accelerator

from shared.config import TrainConfig
from train.step import clip_gradients


def _params() -> dict[str, torch.nn.Parameter]:
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([3.0, -4.0, 0.5])
    return {"lora_A": param}


@pytest.mark.parametrize(
    ("method", "clipped"),
    [
        ("norm", [3.0 * 2 / 25.25**0.5, -4.0 * 2 / 25.25**0.5, 0.5 * 2 / 25.25**0.5]),  # scaled together to norm 2
        ("value", [2.0, -2.0, 0.5]),  # SimpleTuner's default: each element to ±2
    ],
)
def test_gradients_are_clipped_as_grad_clip_method_says_and_their_norm_before_is_returned(method, clipped):
    params = _params()
    norm = clip_gradients(Accelerator(cpu=True), params, TrainConfig(max_grad_norm=2.0, grad_clip_method=method))
    assert norm.item() == pytest.approx(25.25**0.5)
    assert params["lora_A"].grad.tolist() == pytest.approx(clipped)


def test_max_grad_norm_0_clips_nothing():
    params = _params()
    clip_gradients(Accelerator(cpu=True), params, TrainConfig(max_grad_norm=0.0, grad_clip_method="value"))
    assert params["lora_A"].grad.tolist() == [3.0, -4.0, 0.5]
