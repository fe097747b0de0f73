import pytest
import torch

from shared.config import TrainConfig
from train.batch import Batch
from train.model import load_lora_transformer
from train.objective import SigmaSchedule, flow_matching_loss


@pytest.mark.parametrize("target", ["attention", "attention_mlp"])
def test_every_adapter_gets_a_gradient(tiny_models, target):
    """DDP needs a gradient for every trainable parameter, and an adapter whose gradient is always zero would be
    exported as dead weights."""
    config = TrainConfig(
        pretrained_model_name_or_path=str(tiny_models["edit-v1"]),
        base_model_precision="int8-quanto",
        lora_target=target,
    )
    transformer, _ = load_lora_transformer(config, torch.device("cpu"), tokens=64)
    trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    with torch.no_grad():  # as after some training: lora_B no longer zero, so lora_A's gradient is not zero either
        for name, p in trainable.items():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    batch = Batch(
        target=torch.randn(1, 16, 8, 12).bfloat16(),
        references=[torch.randn(1, 16, 8, 8).bfloat16()],
        prompt=torch.randn(1, 9, 32).bfloat16(),
        prompt_mask=None,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = flow_matching_loss(transformer, batch, SigmaSchedule(shift=1.73), torch.Generator().manual_seed(0))
    loss.backward()
    # Every exported adapter must train: a gradient that exists but is zero (e.g. the last block's text
    # query, whose output is discarded) would be a dead adapter in the LoRA file.
    dead = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


@pytest.mark.parametrize("flavour, model", [("edit-v2+", "edit-v2"), ("edit-v3", "edit-v3")])
def test_zero_cond_t_flavours_train_what_diffusers_computes_with_the_flag(tiny_models, flavour, model):
    """edit-v2+ (2509 weights) and edit-v3 (2511) run the transformer with `zero_cond_t`: the training model
    (LoRA still zero) predicts what diffusers' QwenImageTransformer2DModel with the flag predicts, not what it
    predicts without the flag."""
    from diffusers import QwenImageTransformer2DModel

    path = str(tiny_models[model])
    config = TrainConfig(pretrained_model_name_or_path=path, model_flavour=flavour, base_model_precision="no_change")
    ours, _ = load_lora_transformer(config, torch.device("cpu"), tokens=64)
    g = torch.Generator().manual_seed(0)
    inputs = dict(  # 4x4 target tokens, then two references' 4x4 tokens, as the Plus pipeline orders them
        hidden_states=torch.randn(1, 48, 64, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, 9, 32, generator=g).bfloat16(),
        timestep=torch.tensor([0.6]),
        img_shapes=[[(1, 4, 4), (1, 4, 4), (1, 4, 4)]],
        return_dict=False,
    )
    with torch.no_grad():
        predictions = {"ours": ours.eval()(**inputs)[0][:, :16]}
        for flag in (True, False):
            theirs = QwenImageTransformer2DModel.from_pretrained(
                path, subfolder="transformer", torch_dtype=torch.bfloat16, zero_cond_t=flag
            )
            predictions[flag] = theirs(**inputs)[0][:, :16]
    assert ours.config.zero_cond_t
    torch.testing.assert_close(predictions["ours"], predictions[True], rtol=0, atol=0)
    assert (predictions[True].float() - predictions[False].float()).abs().max() > 1e-2


def test_nf4_bnb_quantises_every_block_linear_with_bitsandbytes_under_peft_lora(tiny_models):
    """SimpleTuner's `base_model_precision: nf4-bnb`: the blocks' linear layers become bitsandbytes NF4 layers (peft
    wraps them with its bitsandbytes LoRA layer), and with the LoRA still zero the model predicts what the bf16 model
    predicts, to 4-bit accuracy."""
    bnb = pytest.importorskip("bitsandbytes")  # an optional extra; `make test` installs it
    from diffusers import QwenImageTransformer2DModel
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    path = str(tiny_models["edit-v1"])
    config = TrainConfig(pretrained_model_name_or_path=path, base_model_precision="nf4-bnb")
    ours, plan = load_lora_transformer(config, torch.device("cpu"), tokens=64)
    assert not plan.swapped
    block = ours.transformer_blocks[0]
    linears = [m for m in block.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.weight.quant_type == "nf4" and m.weight.dtype == torch.uint8 for m in linears)
    assert not [n for n, m in block.named_modules() if type(m) is torch.nn.Linear and ".lora_" not in n]  # bf16
    assert isinstance(block.attn.to_q, LoraLinear4bit)  # a LoRA target: peft's bitsandbytes layer

    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 32, 64, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, 9, 32, generator=g).bfloat16(),
        timestep=torch.tensor([0.6]),
        img_shapes=[[(1, 4, 4), (1, 4, 4)]],
        return_dict=False,
    )
    reference = QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.bfloat16)
    with torch.no_grad():
        quantised, full = ours.eval()(**inputs)[0].float(), reference(**inputs)[0].float()
    error = (quantised - full).norm() / full.norm()
    assert 0 < error < 0.2, error  # 4-bit weights: close, not equal


def test_nf4_bnb_without_bitsandbytes_says_what_to_install(monkeypatch):
    import sys

    from shared.errors import UserError
    from train.model import check_precision_available

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"needs bitsandbytes.*pip install 'qwen-edit-trainer\[bnb\]'.*int4-quanto"):
        check_precision_available(TrainConfig(base_model_precision="nf4-bnb"))
