"""The trainable model: the frozen (optionally quantised) transformer with LoRA adapters in fp32."""

from __future__ import annotations

import torch
from peft import LoraConfig

from shared.config import TrainConfig
from shared.models import load_transformer

_ATTENTION_IMAGE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
_ATTENTION_TEXT = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_MLPS = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
LORA_TARGETS = {
    "attention_image": _ATTENTION_IMAGE,
    "attention": _ATTENTION_IMAGE + _ATTENTION_TEXT,
    "attention_mlp": _ATTENTION_IMAGE + _ATTENTION_TEXT + _MLPS,
}

# Layers kept in bf16 when the base is quantised: the input/output projections, the timestep
# embedding and the norms are small and sensitive to rounding.
KEEP_HIGH_PRECISION = ["img_in", "txt_in", "proj_out", "time_text_embed*", "norm_out*", "*norm*"]


def unused_outputs(transformer: torch.nn.Module) -> list[str]:
    """Layers whose output never reaches the loss: the last block's text-stream output and MLP.

    The model returns image tokens only, so adapters there would get no gradient (DDP refuses
    parameters without gradients) and would be exported as dead weights.
    """
    last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}"
    return [f"{last}.attn.to_add_out", f"{last}.txt_mlp.net.0.proj", f"{last}.txt_mlp.net.2"]


def quantize_base(model: torch.nn.Module, precision: str) -> None:
    """Quantise the frozen weights in place with optimum-quanto (`precision` like "int8-quanto")."""
    from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

    weights = {"int8-quanto": qint8, "fp8-quanto": qfloat8, "int4-quanto": qint4, "int2-quanto": qint2}[precision]
    quantize(model, weights=weights, exclude=KEEP_HIGH_PRECISION)
    freeze(model)


def load_lora_transformer(config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Load the transformer with `from_pretrained`, freeze and quantise it, add LoRA adapters."""
    transformer = load_transformer(config.pretrained_model_name_or_path, dtype=torch.bfloat16)
    return prepare_for_lora(transformer, config, device)


def prepare_for_lora(transformer: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Freeze `transformer`, quantise it as `base_model_precision` says, add fp32 LoRA adapters."""
    transformer.requires_grad_(False)
    if config.base_model_precision != "no_change":
        if config.quantize_via == "accelerator":
            transformer.to(device)
        quantize_base(transformer, config.base_model_precision)
    transformer.to(device)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=LORA_TARGETS[config.lora_target],
        exclude_modules=unused_outputs(transformer),
    )
    transformer.add_adapter(lora)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # adapters train in fp32; autocast computes in bf16
    return transformer
