import json

import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline as V1

from shared.flavours import FLAVOURS, SYSTEM_PREFIX
from shared.models import load_processor
from shared.packing import pack_latents, unpack_latents


def test_tiny_models_have_the_diffusers_layout_and_load_with_from_pretrained(tiny_models):
    for flavour, path in tiny_models.items():
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"] == FLAVOURS[flavour].pipeline_class
        for sub in ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"):
            assert (path / sub).is_dir(), sub
    assert isinstance(QwenImageEditPipeline.from_pretrained(tiny_models["edit-v1"]), QwenImageEditPipeline)
    assert isinstance(QwenImageEditPlusPipeline.from_pretrained(tiny_models["edit-v2"]), QwenImageEditPlusPipeline)


def test_tokenizer_has_qwen_special_tokens_and_the_real_template_split(tiny_models):
    tokenizer = load_processor(str(tiny_models["edit-v1"])).tokenizer
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        ids = tokenizer(token)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [token]
    # The pipelines drop the first 64 hidden states: the system prefix must be exactly that long.
    assert len(tokenizer(SYSTEM_PREFIX)["input_ids"]) == FLAVOURS["edit-v1"].drop_tokens == 64


def test_packing_matches_the_pipeline():
    latents = torch.randn(2, 16, 6, 10)
    ours = pack_latents(latents)
    theirs = V1._pack_latents(latents.unsqueeze(2), 2, 16, 6, 10)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_latents(ours, 6, 10), latents)
