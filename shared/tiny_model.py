"""Write a tiny random Qwen-Image-Edit in the diffusers folder layout, for the demo and the tests.

The layout (`model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `processor/`,
`scheduler/`) is that of `Qwen/Qwen-Image-Edit`; everything after this loads it with `from_pretrained`.
Shapes are tiny but the structure is real: a 3-stage VAE (spatial factor 8, z_dim 16), a
Qwen2.5-VL with a vision tower, and a byte-level BPE tokenizer with Qwen's special tokens whose
split of the system prefix is exactly `drop_tokens` (64) tokens, as the real tokenizer's is.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def build_components(seed: int = 0) -> dict:
    """The six pipeline components, with random weights drawn from `seed`."""
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
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
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
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z,
        out_channels=z,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
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


def write_tiny_model(path: str | Path, flavour: str, seed: int = 0) -> Path:
    """Write the tiny model for `flavour` ("edit-v1", "edit-v2", or "edit-v3": a 2511-style model whose
    transformer config has `zero_cond_t`) to `path` and return it."""
    import diffusers

    pipeline_cls = getattr(diffusers, FLAVOURS[flavour].pipeline_class)
    components = build_components(seed)
    if flavour == "edit-v3":
        transformer = components["transformer"]
        components["transformer"] = type(transformer).from_config(transformer.config, zero_cond_t=True)
        components["transformer"].load_state_dict(transformer.state_dict())
    pipeline = pipeline_cls(**components)
    path = Path(path)
    pipeline.save_pretrained(path)
    return path
