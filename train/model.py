"""The trainable model: the frozen (optionally quantised) transformer with LoRA adapters in fp32,
its blocks placed and run as the memory plan says (`train.memory`, `train.blocks`)."""

from __future__ import annotations

import torch
from peft import LoraConfig

from shared.config import LORA_TARGETS, TrainConfig
from shared.errors import UserError
from shared.flavours import FLAVOURS
from shared.models import load_transformer
from train import blocks
from train.blocks import BlockSwap
from train.memory import MemoryPlan, choose_plan, free_memory, host_swap_budget, step_costs
from train.quantised_linear import use_dequantising_linears


def check_lora_targets(config: TrainConfig) -> None:
    """An explicit `lora_target` list must name modules the transformer has (matched as peft matches them:
    the whole name or its ending), checked on an empty (meta) model built from the config: no weights."""
    if not isinstance(config.lora_target, list):
        return
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    try:
        model_config = QwenImageTransformer2DModel.load_config(
            config.pretrained_model_name_or_path, subfolder="transformer"
        )
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not read the transformer config of {config.pretrained_model_name_or_path}: {err}"
        ) from None
    with init_empty_weights():
        names = [name for name, _ in QwenImageTransformer2DModel.from_config(model_config).named_modules()]
    unknown = [t for t in config.lora_target if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        examples = ", ".join(LORA_TARGETS["attention_mlp"][:4])
        raise UserError(
            f"lora_target names module(s) this transformer does not have: {', '.join(unknown)}; use names such as "
            f"{examples}, or a preset ({', '.join(LORA_TARGETS)})"
        )


def check_precision_available(config: TrainConfig) -> None:
    """`base_model_precision: nf4-bnb` needs bitsandbytes, an optional extra: say so before anything loads."""
    if config.base_model_precision != "nf4-bnb":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            "base_model_precision 'nf4-bnb' needs bitsandbytes, which is not installed: "
            "pip install 'qwen-edit-trainer[bnb]' (or pip install bitsandbytes); without it, int4-quanto is the "
            "nearest (4-bit weights through optimum-quanto)"
        ) from None


def quantise_nf4(block: torch.nn.Module, device: torch.device) -> None:
    """Replace every linear layer of `block` with bitsandbytes' 4-bit NormalFloat layer (QLoRA's setting: NF4
    weights in blocks of 64 with double-quantised scales, bf16 compute), quantised as it moves to `device`."""
    import bitsandbytes as bnb

    for module in list(block.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
            )
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            # bitsandbytes repacks CPU weights for AVX512 inference on the first no-grad call, which fails for
            # small layers (and previews on a CPU run are no-grad): keep the one packing training uses.
            layer.support_avx512bf16_for_cpu = False
            setattr(module, name, layer.to(device))  # Params4bit quantises when it moves to a device


def unused_outputs(transformer: torch.nn.Module) -> list[str]:
    """Layers whose output never reaches the loss: the last block's text-stream query, output and MLP.

    The model returns image tokens only, and the last block's text tokens are discarded after it: its
    text queries (`add_q_proj`) only shape the text tokens' attention output, which feeds `to_add_out`
    and the text MLP, all discarded. (Its text keys and values do reach the image tokens.) Adapters there
    would get no gradient (DDP refuses parameters without gradients) and would be exported dead.
    """
    last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}"
    return [f"{last}.attn.{name}" for name in ("add_q_proj", "to_add_out")] + [
        f"{last}.txt_mlp.net.0.proj",
        f"{last}.txt_mlp.net.2",
    ]


def place_blocks(
    model: torch.nn.Module, precision: str, device: torch.device, via: str, swap: BlockSwap | None
) -> None:
    """Quantise the frozen blocks with optimum-quanto (bitsandbytes for `nf4-bnb`; none for `no_change`) one
    at a time, and place each:
    on `device`, or, for blocks `swap` names, in pinned host memory behind its GPU slot.

    `via` "accelerator" moves each bf16 block to `device` and quantises it there (fast); "cpu"
    quantises each block on the CPU and moves only the quantised block. Either way the GPU never
    holds more than the resident blocks plus one bf16 block, so a 20B model needs no 40 GB GPU.
    Everything outside the blocks (img_in, txt_in, txt_norm, time_text_embed, norm_out, proj_out)
    and every norm inside them stays in bf16.
    """
    from optimum.quanto import freeze, qfloat8, qfloat8_e4m3fnuz, qint2, qint4, qint8, quantize

    weights = {
        "int8-quanto": qint8,
        "fp8-quanto": qfloat8,
        "fp8uz-quanto": qfloat8_e4m3fnuz,  # as SimpleTuner's fp8uz-quanto
        "int4-quanto": qint4,
        "int2-quanto": qint2,
    }.get(precision)
    for index, block in enumerate(model.transformer_blocks):
        if precision == "nf4-bnb":  # never swapped: bitsandbytes keeps scales beside the tensor a swap copies
            quantise_nf4(block, device if via == "accelerator" else torch.device("cpu"))
        elif weights is not None:
            if via == "accelerator":
                block.to(device)
            quantize(block, weights=weights, exclude=["*norm*"])
            freeze(block)
            block.requires_grad_(False)  # freeze() makes new Parameters, which default to requires_grad
            block.to(device)  # the weights' final layout: quanto repacks fp8 arriving on a GPU
            use_dequantising_linears(block)  # quanto's arithmetic, in ops torch.compile fuses
        if swap is not None and index in swap.slot_of:
            swap.adopt(index, block)
        else:
            block.to(device)


def load_lora_transformer(
    config: TrainConfig, device: torch.device, tokens: int, explicit: set[str] = frozenset()
) -> tuple[torch.nn.Module, MemoryPlan]:
    """Load the transformer with `from_pretrained`, choose its memory plan for batches of `tokens`
    tokens within the budget (`memory_budget_gib`, else the GPU's free memory), quantise, place, add LoRA."""
    zero_cond_t = FLAVOURS[config.model_flavour].zero_cond_t
    transformer = load_transformer(config.pretrained_model_name_or_path, dtype=torch.bfloat16, zero_cond_t=zero_cond_t)
    costs = step_costs(transformer, config, tokens)
    plan = choose_plan(config, costs, free_memory(device, config), explicit, host_swap_budget())
    return prepare_for_lora(transformer, config, device, plan), plan


def prepare_for_lora(
    transformer: torch.nn.Module, config: TrainConfig, device: torch.device, plan: MemoryPlan
) -> torch.nn.Module:
    """Freeze `transformer`, quantise it as `base_model_precision` says, place its blocks as `plan`
    says, add fp32 LoRA adapters, and give every block its checkpointing / compile / swap behaviour."""
    transformer.requires_grad_(False)
    swap = BlockSwap(list(plan.swapped), device) if plan.swapped else None
    place_blocks(transformer, config.base_model_precision, device, config.quantize_via, swap)
    transformer.to(device)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha or config.lora_rank,  # unset: the rank (SimpleTuner), a scale of 1
        lora_dropout=config.lora_dropout,
        init_lora_weights=True,  # SimpleTuner's lora_init_type "default": A kaiming-uniform, B zero
        target_modules=config.lora_modules,
        exclude_modules=unused_outputs(transformer),
    )
    # What from_pretrained sets on a bitsandbytes model; peft reads it to wrap NF4 layers with its 4-bit LoRA layer.
    transformer.is_loaded_in_4bit = config.base_model_precision == "nf4-bnb"
    transformer.add_adapter(lora)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # adapters train in fp32; autocast computes in bf16
    blocks.install(
        transformer, set(plan.checkpointed), plan.selective, plan.offload_activations, plan.compile_blocks, swap
    )
    return transformer
