"""Per-flavour rules: prompt templates, dropped template tokens, VL/VAE sizes, reference counts, and
whether the transformer runs with `zero_cond_t`.

The strings and numbers here are those of diffusers' `QwenImageEditPipeline` (edit-v1) and
`QwenImageEditPlusPipeline` (edit-v2, edit-v2+, edit-v3); training on anything else trains what
inference never sees. edit-v3 is Qwen-Image-Edit-2511: the Plus pipeline's encodings, and a
transformer whose reference tokens are modulated with timestep 0 (`zero_cond_t`, a config flag of
diffusers' `QwenImageTransformer2DModel`). edit-v2+ trains the 2509 weights with that flag on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    zero_cond_t: bool = False  # the transformer modulates reference tokens with timestep 0 (2511)

    @property
    def plus(self) -> bool:
        """Encodes as `QwenImageEditPlusPipeline` does (several references, "Picture n:" template)."""
        return self.pipeline_class == "QwenImageEditPlusPipeline"

    def vl_text(self, instruction: str, n_references: int) -> str:
        """The full text the VL encoder reads for one instruction (image pads expanded by the processor)."""
        if not self.plus:
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
}
# Qwen-Image-Edit-2509: the Plus pipeline, 1-3 pictures, each seen by the VL encoder at 384².
FLAVOURS["edit-v2"] = replace(
    FLAVOURS["edit-v1"],
    name="edit-v2",
    default_model="Qwen/Qwen-Image-Edit-2509",
    pipeline_class="QwenImageEditPlusPipeline",
    max_references=3,
    vl_area=384 * 384,
)

# 2509 weights trained with zero_cond_t, and Qwen-Image-Edit-2511: the Plus pipeline's encodings either way.
FLAVOURS["edit-v2+"] = replace(FLAVOURS["edit-v2"], name="edit-v2+", zero_cond_t=True)
FLAVOURS["edit-v3"] = replace(
    FLAVOURS["edit-v2"], name="edit-v3", default_model="Qwen/Qwen-Image-Edit-2511", zero_cond_t=True
)

SYSTEM_PREFIX = _SYSTEM  # exposed so the tiny tokenizer can be checked to split it into drop_tokens tokens


def flavour_of_weights(model: str) -> str | None:
    """The flavour a local diffusers folder's weights are: its pipeline class (`model_index.json`) and, for the
    Plus pipeline, whether its transformer modulates references with timestep 0 (2511: edit-v3). None when
    `model` is not a local folder that says (a hub id, or an older layout)."""
    import json
    from pathlib import Path

    try:
        index = json.loads((Path(model) / "model_index.json").read_text())
        transformer = json.loads((Path(model) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    pipeline = index.get("_class_name") if isinstance(index, dict) else None
    if pipeline == "QwenImageEditPipeline":
        return "edit-v1"
    if pipeline == "QwenImageEditPlusPipeline":
        return "edit-v3" if isinstance(transformer, dict) and transformer.get("zero_cond_t") else "edit-v2"
    return None
