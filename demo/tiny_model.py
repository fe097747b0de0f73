"""Write a tiny random Qwen-Image-Edit in the diffusers folder layout, for the demo and the tests.

The layout (`model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `processor/`,
`scheduler/`) is that of `Qwen/Qwen-Image-Edit`; everything after this loads it with `from_pretrained`.
Shapes are tiny but the structure is real: a 3-stage VAE (spatial factor 8, z_dim 16), a
Qwen2.5-VL with a vision tower, and a byte-level BPE tokenizer with Qwen's special tokens whose
split of the system prefix is exactly `drop_tokens` (64) tokens, as the real tokenizer's is.

The VAE's weights are random (tests), or set so that it reconstructs (`reconstructing_vae`: the demo):
its latents hold the image's 8x8-pixel block means and decoding paints each block back, so previews
look like the images on disk, only blockier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from shared.flavours import FLAVOURS, SYSTEM_PREFIX

# Qwen2.5-VL's added tokens, in the real vocabulary's order.
SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# The official checkpoints' scheduler settings (scheduler/scheduler_config.json of Qwen-Image-Edit*).
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    shift=1.0,
    shift_terminal=0.02,
    use_dynamic_shifting=True,
    time_shift_type="exponential",
)
TEXT_DIM = 32  # hidden size of the tiny text encoder (3584 in the real one)
LATENT_CHANNELS = 16  # z_dim, as in the real VAE


def build_tokenizer():
    """A Qwen2Tokenizer with a small BPE vocabulary trained on the templates and common edit words."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    words = (
        "Picture 1: 2: 3: make turn add remove change replace the a an it into to of with and in on "
        "red green blue yellow white black purple orange color sky hat car circle square box background "
        "painting photo style bigger smaller left right top bottom object image"
    )
    system = SYSTEM_PREFIX.replace("<|im_start|>", " ").replace("<|im_end|>", " ")
    corpus = ["system", "user", "assistant"] * 30 + [system] * 50 + [words] * 20
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=merges, additional_special_tokens=SPECIAL_TOKENS)


def build_components(
    seed: int = 0,
    reconstructing_vae: bool = False,
    heads: int = 2,
    head_dim: int = 16,
    blind_text_encoder: bool = False,
    vision_patch: int = 14,
) -> dict:
    """The six pipeline components, with random weights drawn from `seed` (the VAE's set to reconstruct with
    `reconstructing_vae`); the transformer has `heads` attention heads of `head_dim`. `blind_text_encoder`
    zeroes the vision tower's output, so the prompt embeddings carry the instruction but nothing of the
    pictures: what an edit needs from them reaches the transformer only as reference latents (the demo).
    `vision_patch` is the vision tower's patch side in pixels (14 in the real one, and the processor's too): the
    demo's 28 gives a quarter of the picture tokens, most of a Plus prompt's length at 384² a picture."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    # The real processor's pixel limits (min_pixels 3136, max_pixels 12845056).
    size = {"shortest_edge": 3136, "longest_edge": 12845056}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=vision_patch),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(patch_size=vision_patch),
    )
    torch.manual_seed(seed)
    text_config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": TEXT_DIM,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
            "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={
            "depth": 2,
            "patch_size": vision_patch,
            "window_size": 8 * vision_patch,  # windows of 8x8 patches, as the real tower's 112 pixels at 14
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TEXT_DIM,
            "fullatt_block_indexes": [1],
        },
        vocab_size=len(tokenizer),
        bos_token_id=token_id("<|endoftext|>"),
        eos_token_id=token_id("<|im_end|>"),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        vision_token_id=token_id("<|vision_pad|>"),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(text_config)
    if blind_text_encoder:
        with torch.no_grad():
            merger_out = text_encoder.model.visual.merger.mlp[-1]  # the last layer before the language model
            merger_out.weight.zero_()
            merger_out.bias.zero_()
    z = LATENT_CHANNELS
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        # Non-trivial statistics so that a missing normalisation shows up in tests.
        latents_mean=[round(0.05 * i - 0.4, 3) for i in range(z)],
        latents_std=[round(1.0 + 0.1 * i, 3) for i in range(z)],
    )
    if reconstructing_vae:
        make_reconstructing(vae)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z,
        out_channels=z,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),  # frame, row, column
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": processor,
        "transformer": transformer,
    }


def _identity(weight: torch.Tensor, tap: tuple[int, ...]) -> None:
    """Conv `weight` [out, in, *kernel]: output channel i copies input channel i at kernel position `tap`."""
    for i in range(min(weight.shape[0], weight.shape[1])):
        weight[(i, i, *tap)] = 1.0


@torch.no_grad()
def make_reconstructing(vae, constant: float = 30.0) -> None:
    """Set the weights of a tiny `AutoencoderKLQwenImage` so that its latent channels 0-2 are each 8x8 block's
    mean RGB in [-1, 1] (the other channels 0) and decoding paints every block in its mean colour.

    Every residual and attention branch adds 0 (its last conv or projection is zero), so only the skip paths
    and resamplers act: each downsampling conv averages 2x2 pixels, each upsampling conv copies the nearest
    pixel's channels. Two layers are not linear: the RMS norm over channels before each output conv, and the
    SiLU after it. Channels ±R, ±G, ±B and one held at `constant` get through both: SiLU(a) − SiLU(−a) = a
    exactly, and `constant` dominates the norm (|RGB| ≤ √3 changes it by at most 0.33% at 30).
    """
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageResample, QwenImageResidualBlock

    for name, param in vae.named_parameters():
        param.fill_(1.0 if name.endswith("gamma") else 0.0)  # RMS norm scales 1, everything else 0
    for module in vae.modules():
        if isinstance(module, QwenImageResidualBlock) and not isinstance(module.conv_shortcut, torch.nn.Identity):
            _identity(module.conv_shortcut.weight, (0, 0, 0))
        if isinstance(module, QwenImageResample) and module.mode.startswith("down"):
            conv = module.resample[1]  # after ZeroPad2d((0, 1, 0, 1)), stride 2: taps 0-1 are a 2x2 block
            for i in range(conv.weight.shape[0]):
                conv.weight[i, i, :2, :2] = 0.25
        if isinstance(module, QwenImageResample) and module.mode.startswith("up"):
            _identity(module.resample[1].weight, (1, 1))  # after nearest upsampling: the pixel itself
    frame = (2, 1, 1)  # causal 3x3x3 convs: the current frame is the last time tap; the spatial centre
    for coder in (vae.encoder, vae.decoder):
        for c in range(3):  # conv_in: +colour, -colour and the constant channel
            coder.conv_in.weight[(c, c, *frame)] = 1.0
            coder.conv_in.weight[(3 + c, c, *frame)] = -1.0
        coder.conv_in.bias[6] = constant
        # after the norm a channel holds x·√C/|x| ≈ x·√C/constant: conv_out undoes that scale
        gain = constant / coder.conv_out.weight.shape[1] ** 0.5
        for c in range(3):
            coder.conv_out.weight[(c, c, *frame)] = gain
            coder.conv_out.weight[(c, 3 + c, *frame)] = -gain
    _identity(vae.quant_conv.weight, (0, 0, 0))  # the posterior's mean is the encoder's output; log-variance 0
    _identity(vae.post_quant_conv.weight, (0, 0, 0))


def write_tiny_model(path: str | Path, flavour: str, **options: Any) -> Path:
    """Write the tiny model for `flavour` ("edit-v1", "edit-v2", or "edit-v3": a 2511-style model whose
    transformer config has `zero_cond_t`) to `path` and return it; `options` are `build_components`'."""
    import diffusers

    pipeline_cls = getattr(diffusers, FLAVOURS[flavour].pipeline_class)
    components = build_components(**options)
    if flavour == "edit-v3":
        transformer = components["transformer"]
        components["transformer"] = type(transformer).from_config(transformer.config, zero_cond_t=True)
        components["transformer"].load_state_dict(transformer.state_dict())
    pipeline = pipeline_cls(**components)
    path = Path(path)
    pipeline.save_pretrained(path)
    return path
