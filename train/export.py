"""Save LoRA adapters as safetensors that diffusers' `load_lora_weights` accepts."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from peft.utils import get_peft_model_state_dict

from shared.flavours import Flavour

LORA_FILE = "pytorch_lora_weights.safetensors"


def save_lora_diffusers(transformer: torch.nn.Module, out_dir: Path, flavour: Flavour) -> Path:
    """Write `<out_dir>/pytorch_lora_weights.safetensors` (keys `transformer.*.lora_A/B.weight`).

    The adapter's LoRA config (rank, alpha, targets) goes into the file's metadata, so the
    alpha/rank scale is honoured when the pipeline loads it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(transformer).items()
    }
    metadata = transformer.peft_config["default"].to_dict()
    # Exactly the modules that have weights (e.g. "transformer_blocks.0.attn.to_q"), so a loader
    # creates no adapter the file has no weights for.
    metadata["target_modules"] = sorted({key.split(".lora_")[0] for key in state})
    metadata["exclude_modules"] = None
    pipeline_cls = getattr(diffusers, flavour.pipeline_class)
    pipeline_cls.save_lora_weights(
        out_dir,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=metadata,
        weight_name=LORA_FILE,
        safe_serialization=True,
    )
    return out_dir / LORA_FILE
