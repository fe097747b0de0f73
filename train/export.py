"""Write LoRA adapters in the formats users load: diffusers (`load_lora_weights`) and ComfyUI.

Both start from peft's adapter state dict (keys `transformer_blocks.0.attn.to_q.lora_A.weight`,
fp32) and the adapter's LoRA config (rank, alpha, targets), as training and checkpoints hold them.

- diffusers: `pytorch_lora_weights.safetensors`, keys `transformer.<module>.lora_A/B.weight`,
  with the LoRA config in the file's metadata so the pipeline honours alpha.
- ComfyUI: `<name>.safetensors`, keys `diffusion_model.<module>.lora_down.weight` (= A),
  `.lora_up.weight` (= B) and `.alpha`; ComfyUI applies W + alpha/rank · up @ down.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from safetensors.torch import save_file

from shared.flavours import Flavour

LORA_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "lora_comfyui.safetensors"
FORMATS = ("diffusers", "comfyui")


def json_safe(obj: dict) -> dict:
    """A JSON-safe copy of a peft config dict (sets become sorted lists)."""
    return json.loads(json.dumps(obj, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))


def lora_metadata(lora_config: dict, state: dict[str, torch.Tensor]) -> dict:
    """The adapter config to store with the weights: exactly the modules that have weights."""
    metadata = json_safe(lora_config)
    metadata["target_modules"] = sorted({key.split(".lora_")[0] for key in state})
    metadata["exclude_modules"] = None
    return metadata


def save_diffusers(state: dict[str, torch.Tensor], lora_config: dict, out_dir: Path, flavour: Flavour) -> Path:
    """`<out_dir>/pytorch_lora_weights.safetensors`, through the pipeline's own `save_lora_weights`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    pipeline_cls = getattr(diffusers, flavour.pipeline_class)
    pipeline_cls.save_lora_weights(
        out_dir,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=lora_metadata(lora_config, state),
        weight_name=LORA_FILE,
        safe_serialization=True,
    )
    return out_dir / LORA_FILE


def comfyui_state(state: dict[str, torch.Tensor], lora_config: dict) -> dict[str, torch.Tensor]:
    """peft keys -> ComfyUI keys, with one `.alpha` per module (alpha of the run, or its rank pattern)."""
    out = {}
    alphas = lora_config.get("alpha_pattern") or {}
    for key, value in state.items():
        module, rest = key.split(".lora_")
        name = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[rest]
        out[f"diffusion_model.{module}.{name}"] = value.detach().to("cpu", torch.float32).contiguous()
        alpha = alphas.get(module, lora_config["lora_alpha"])
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(alpha))
    return out


def save_comfyui(state: dict[str, torch.Tensor], lora_config: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "comfyui-lora", "lora_config": json.dumps(lora_metadata(lora_config, state))}
    save_file(comfyui_state(state, lora_config), str(path), metadata=metadata)
    return path


def save(state: dict, lora_config: dict, fmt: str, out_dir: Path, flavour: Flavour) -> Path:
    """Write `state` in `fmt` ("diffusers" or "comfyui") into `out_dir`; return the file."""
    if fmt == "diffusers":
        return save_diffusers(state, lora_config, out_dir, flavour)
    return save_comfyui(state, lora_config, out_dir / COMFYUI_FILE)
