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


def unused_outputs(transformer: torch.nn.Module) -> list[str]:
    """Layers whose output never reaches the loss: the last block's text-stream output and MLP.

    The model returns image tokens only, so adapters there would get no gradient (DDP refuses
    parameters without gradients) and would be exported as dead weights.
    """
    last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}"
    return [f"{last}.attn.to_add_out", f"{last}.txt_mlp.net.0.proj", f"{last}.txt_mlp.net.2"]


def quantize_base(model: torch.nn.Module, precision: str, device: torch.device, via: str) -> None:
    """Quantise the frozen transformer blocks with optimum-quanto, one block at a time, onto `device`.

    `via` "accelerator" moves each bf16 block to `device` and quantises it there (fast); "cpu"
    quantises each block on the CPU and moves only the quantised block. Either way the GPU never
    holds more than the quantised model plus one bf16 block, so a 20B model needs no 40 GB GPU.
    Everything outside the blocks (img_in, txt_in, txt_norm, time_text_embed, norm_out, proj_out)
    and every norm inside them stays in bf16.
    """
    from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

    weights = {"int8-quanto": qint8, "fp8-quanto": qfloat8, "int4-quanto": qint4, "int2-quanto": qint2}[precision]
    for block in model.transformer_blocks:
        if via == "accelerator":
            block.to(device)
        quantize(block, weights=weights, exclude=["*norm*"])
        freeze(block)
        block.to(device)


def load_lora_transformer(config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Load the transformer with `from_pretrained`, freeze and quantise it, add LoRA adapters."""
    transformer = load_transformer(config.pretrained_model_name_or_path, dtype=torch.bfloat16)
    return prepare_for_lora(transformer, config, device)


def prepare_for_lora(transformer: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Freeze `transformer`, quantise it as `base_model_precision` says, add fp32 LoRA adapters."""
    transformer.requires_grad_(False)
    if config.base_model_precision != "no_change":
        quantize_base(transformer, config.base_model_precision, device, config.quantize_via)
    transformer.to(device)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=config.lora_target if isinstance(config.lora_target, list) else LORA_TARGETS[config.lora_target],
        exclude_modules=unused_outputs(transformer),
    )
    transformer.add_adapter(lora)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # adapters train in fp32; autocast computes in bf16
    return transformer
