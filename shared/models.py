"""Load Qwen-Image-Edit components with `from_pretrained`, from a hub id or a local diffusers folder.

The tiny offline default (`shared.tiny_model`) is loaded by exactly these functions too.
"""

from __future__ import annotations

import torch

from shared.errors import UserError


def _load(cls, path: str, subfolder: str, **kwargs):
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load '{subfolder}' from '{path}': {err}\n"
            "Set pretrained_model_name_or_path to a diffusers folder of Qwen-Image-Edit (or a hub id "
            "already in your Hugging Face cache)."
        ) from None


def load_vae(path: str, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKLQwenImage

    return _load(AutoencoderKLQwenImage, path, "vae", torch_dtype=dtype).eval().requires_grad_(False)


def load_text_encoder(path: str, dtype: torch.dtype = torch.bfloat16):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _load(Qwen2_5_VLForConditionalGeneration, path, "text_encoder", dtype=dtype).eval().requires_grad_(False)


def load_processor(path: str):
    from transformers import Qwen2VLProcessor

    return _load(Qwen2VLProcessor, path, "processor")


def load_transformer(path: str, dtype: torch.dtype = torch.bfloat16):
    from diffusers import QwenImageTransformer2DModel

    return _load(QwenImageTransformer2DModel, path, "transformer", torch_dtype=dtype)


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell along each side (8 for the real VAE), as the pipelines compute it."""
    return 2 ** len(vae.temperal_downsample)


def load_scheduler_config(path: str) -> dict:
    """The model's FlowMatchEulerDiscreteScheduler settings (shift rules), read without weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler"))
    except (OSError, ValueError) as err:
        raise UserError(f"could not read 'scheduler' config from '{path}': {err}") from None
