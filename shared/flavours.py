"""Per-flavour rules: prompt templates, dropped template tokens, VL/VAE sizes, reference counts.

The strings and numbers here are those of diffusers' `QwenImageEditPipeline` (edit-v1) and
`QwenImageEditPlusPipeline` (edit-v2); training on anything else trains what inference never sees.
"""

from __future__ import annotations

from dataclasses import dataclass

_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
    "objects, background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining consistency "
    "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n"
)
_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
_VISION = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class Flavour:
    name: str
    default_model: str  # hub id of the official checkpoint
    pipeline_class: str  # diffusers pipeline that runs this flavour at inference
    min_references: int
    max_references: int
    vl_area: int  # pixels: each reference is resized to about this area for the VL encoder
    reference_vae_area: int  # pixels: a reference's own VAE size (reference_loose / edit-v2)
    drop_tokens: int = 64  # hidden states of the template's system prefix, dropped from the embedding

    def vl_text(self, instruction: str, n_references: int) -> str:
        """The full text the VL encoder reads for one instruction (image pads expanded by the processor)."""
        if self.name == "edit-v1":
            return f"{_SYSTEM}{_VISION}{instruction}{_ASSISTANT}"
        pictures = "".join(f"Picture {i + 1}: {_VISION}" for i in range(n_references))
        return f"{_SYSTEM}{pictures}{instruction}{_ASSISTANT}"


FLAVOURS: dict[str, Flavour] = {
    "edit-v1": Flavour(
        name="edit-v1",
        default_model="Qwen/Qwen-Image-Edit",
        pipeline_class="QwenImageEditPipeline",
        min_references=1,
        max_references=1,
        vl_area=1024 * 1024,
        reference_vae_area=1024 * 1024,
    ),
    "edit-v2": Flavour(
        name="edit-v2",
        default_model="Qwen/Qwen-Image-Edit-2509",
        pipeline_class="QwenImageEditPlusPipeline",
        min_references=1,
        max_references=3,
        vl_area=384 * 384,
        reference_vae_area=1024 * 1024,
    ),
}

SYSTEM_PREFIX = _SYSTEM  # exposed so the tiny tokenizer can be checked to split it into drop_tokens tokens
