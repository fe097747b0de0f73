"""Load Qwen-Image-Edit components with `from_pretrained`, from a hub id or a local diffusers folder.

The tiny offline default (`demo.tiny_model`) is loaded by exactly these functions too.
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


def load_transformer(path: str, dtype: torch.dtype = torch.bfloat16, zero_cond_t: bool = False):
    """The transformer; `zero_cond_t` turns on the 2511 flag (reference tokens modulated with timestep 0),
    which edit-v3's checkpoints have and edit-v2+ sets on 2509 weights."""
    from diffusers import QwenImageTransformer2DModel

    kwargs = {"zero_cond_t": True} if zero_cond_t else {}
    return _load(QwenImageTransformer2DModel, path, "transformer", torch_dtype=dtype, **kwargs)


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell along each side (8 for the real VAE), as the pipelines compute it."""
    return 2 ** len(vae.temperal_downsample)


def vae_scale_factor_of(path: str) -> int:
    """`vae_scale_factor` of the model at `path`, from its VAE's config alone (no weights loaded)."""
    from diffusers import AutoencoderKLQwenImage

    return 2 ** len(AutoencoderKLQwenImage.load_config(path, subfolder="vae")["temperal_downsample"])


def load_scheduler_config(path: str) -> dict:
    """The model's FlowMatchEulerDiscreteScheduler settings (shift rules), read without weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    try:
        return dict(FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler"))
    except (OSError, ValueError) as err:
        raise UserError(f"could not read 'scheduler' config from '{path}': {err}") from None


# The VAE tensors that decoding uses; everything else (the encoder, quant_conv) is never read.
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def load_vae_decoder(path: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16):
    """The VAE with only its decoder loaded (on `device`): the encoder stays on the meta device, no weights.

    Built empty from the VAE's config, then the decoder's tensors are read from the safetensors file(s)
    alone, so training (which decodes previews) never holds the encoder: a few hundred MB less, and
    proof that nothing is encoded while training.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage
    from safetensors import safe_open

    try:
        config = AutoencoderKLQwenImage.load_config(path, subfolder="vae")
        files = _vae_weight_files(path)
    except (OSError, ValueError) as err:
        raise UserError(f"could not read the VAE of '{path}': {err}") from None
    with init_empty_weights():
        vae = AutoencoderKLQwenImage.from_config(config)
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(DECODER_PREFIXES)})
    wanted = {k for k in vae.state_dict() if k.startswith(DECODER_PREFIXES)}
    if wanted - set(state):
        raise UserError(f"the VAE of '{path}' lacks decoder weights (e.g. {sorted(wanted - set(state))[0]})")
    vae.load_state_dict(state, strict=False, assign=True)
    vae.decoder.to(device, dtype)
    vae.post_quant_conv.to(device, dtype)
    return vae.eval().requires_grad_(False)


def _vae_weight_files(path: str) -> list:
    """The VAE's safetensors file(s): from a local diffusers folder, or the Hugging Face cache for a hub id."""
    from pathlib import Path

    local = Path(path) / "vae"
    if local.is_dir():
        files = sorted(local.glob("*.safetensors"))
        if not files:
            raise OSError(f"no .safetensors file in {local}")
        return files
    from huggingface_hub import hf_hub_download

    return [Path(hf_hub_download(path, "diffusion_pytorch_model.safetensors", subfolder="vae"))]
