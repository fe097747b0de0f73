"""Each base_model_precision quantises the transformer blocks as it says, trains, and writes a plain LoRA."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageEditPipeline
from safetensors.torch import load_file

from shared.config import load_config
from tests.train.conftest import QUICK
from train.loop import train

# base_model_precision -> what each Linear inside the transformer blocks must be once loaded: its class and
# (quanto) its weights' qtype, and at most what fraction of its bf16 bytes its frozen weight may take.
QUANTISED = {
    "no_change": ("Linear", None, 1.0),
    "int8-quanto": ("QLinear", "qint8", 0.55),  # int8 data and per-row scales
    "fp8-quanto": ("QLinear", "qfloat8_e4m3fn", 0.55),
    "fp8uz-quanto": ("QLinear", "qfloat8_e4m3fnuz", 0.55),
    "int4-quanto": ("QLinear", "qint4", 0.4),  # packed two to a byte, with group scales and shifts
    "int2-quanto": ("QLinear", "qint2", 0.3),
    "nf4-bnb": ("Linear4bit", None, 0.3),
}


def _frozen_bytes(weight: torch.Tensor) -> int:
    """Bytes a frozen base weight holds: a quanto tensor's data and scales, or the tensor's own storage."""
    parts = [getattr(weight, name) for name in ("_data", "_scale", "_shift") if hasattr(weight, name)]
    if not parts:
        return weight.untyped_storage().nbytes()
    return sum(_frozen_bytes(p) for p in parts)


@pytest.mark.parametrize(
    "precision,via",
    [("no_change", "accelerator"), ("int8-quanto", "cpu"), ("fp8-quanto", "accelerator"), ("int4-quanto", "cpu"),
     ("int2-quanto", "accelerator"), ("fp8uz-quanto", "accelerator"), ("nf4-bnb", "cpu")],
)  # fmt: skip
def test_each_base_precision_quantises_every_block_linear_and_trains_a_step(
    project,
    tmp_path,
    monkeypatch,
    precision,
    via,
):
    import train.run as run_module

    loaded = []
    real_load = run_module.load_lora_transformer
    monkeypatch.setattr(
        run_module, "load_lora_transformer", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1]
    )
    # one step of one micro-batch, no previews or EMA (QUICK): what is asserted is the loaded model and the LoRA
    settings = dict(QUICK, base_model_precision=precision, quantize_via=via, lr_warmup_steps=0)
    settings.update(gradient_accumulation_steps=1)
    config = load_config(project(tmp_path / "run", max_train_steps=1, lr_scheduler="constant", **settings))
    lora_path = train(config)

    ((transformer, _),) = loaded
    kind, qtype, most = QUANTISED[precision]
    linears = [  # the frozen base layers (quanto's and bitsandbytes' subclass Linear), not the LoRA adapters
        m
        for name, m in transformer.transformer_blocks.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name
    ]
    assert linears and all(any(c.__name__ == kind for c in type(m).__mro__) for m in linears), {
        type(m).__name__ for m in linears
    }
    assert {getattr(getattr(m.weight, "qtype", None), "name", None) for m in linears} == {qtype}
    bf16_bytes = sum(m.in_features * m.out_features * 2 for m in linears)
    assert sum(_frozen_bytes(m.weight) for m in linears) <= most * bf16_bytes

    lora = load_file(lora_path)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    # whatever the base precision, the LoRA is a plain one over the bf16 model's names: diffusers loads it
    pipe = QwenImageEditPipeline.from_pretrained(config.train.pretrained_model_name_or_path)
    pipe.load_lora_weights(lora_path.parent)
    assert sum(1 for m in pipe.transformer.modules() if hasattr(m, "lora_A")) == sum("lora_A" in k for k in lora)
