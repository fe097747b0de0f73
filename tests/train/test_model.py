import pytest
import torch

from shared.config import TrainConfig
from train.loader import Batch
from train.model import load_lora_transformer
from train.objective import SigmaSchedule, flow_matching_loss


@pytest.mark.parametrize("target", ["attention", "attention_mlp"])
def test_every_adapter_gets_a_gradient(tiny_models, target):
    """DDP needs a gradient for every trainable parameter; dead adapters would also be exported for nothing."""
    config = TrainConfig(
        pretrained_model_name_or_path=str(tiny_models["edit-v1"]),
        base_model_precision="int8-quanto",
        lora_target=target,
    )
    transformer, _ = load_lora_transformer(config, torch.device("cpu"), tokens=64)
    trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    batch = Batch(
        target=torch.randn(1, 16, 8, 12).bfloat16(),
        references=[torch.randn(1, 16, 8, 8).bfloat16()],
        prompt=torch.randn(1, 9, 32).bfloat16(),
        prompt_mask=None,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = flow_matching_loss(transformer, batch, SigmaSchedule(shift=1.73), torch.Generator().manual_seed(0))
    loss.backward()
    # lora_B starts at zero, so lora_A's gradient is zero on the first step; it must still exist.
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, missing
