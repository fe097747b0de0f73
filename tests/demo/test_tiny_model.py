import json

import numpy as np
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline as V1

from shared.flavours import FLAVOURS, SYSTEM_PREFIX
from shared.models import load_processor
from train.packing import pack_latents, unpack_latents


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


def test_the_demos_vae_reconstructs_each_8x8_block_in_its_mean_colour_through_from_pretrained(tmp_path):
    """`make demo`'s tiny VAE (written with `reconstructing_vae`, loaded back as any checkpoint is): its latents
    hold the image's 8x8 block means (channels 0-2, in [-1, 1]) and decoding paints them back, so previews show
    the references and ground truth as they are on disk. In fp32 within 0.5% of the range, in bf16 (as
    training decodes previews) within 1.5%."""
    from diffusers import AutoencoderKLQwenImage
    from PIL import Image

    from demo.data import write_demo_dataset
    from demo.tiny_model import write_tiny_model

    path = write_tiny_model(tmp_path / "model", "edit-v1", reconstructing_vae=True)
    vae = AutoencoderKLQwenImage.from_pretrained(path, subfolder="vae")
    data = write_demo_dataset(tmp_path / "data", n_samples=3)
    for image_path in sorted((data / "images").glob("*.png")):  # three aspect ratios
        pixels = torch.tensor(np.asarray(Image.open(image_path).convert("RGB")), dtype=torch.float32)
        x = (pixels.permute(2, 0, 1) / 127.5 - 1)[None, :, None]  # [1, 3, 1, H, W]
        blocks = torch.nn.functional.avg_pool2d(x[:, :, 0], 8)  # [1, 3, H/8, W/8]
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mode()  # [1, 16, 1, H/8, W/8]
            decoded = vae.decode(latents).sample[:, :, 0]
            decoded_bf16 = vae.to(torch.bfloat16).decode(latents.bfloat16()).sample[:, :, 0].float()
            vae.float()
        torch.testing.assert_close(latents[:, :3, 0], blocks, rtol=0, atol=0.01)
        assert latents[:, 3:].abs().max() == 0
        painted = torch.nn.functional.interpolate(blocks, scale_factor=8, mode="nearest")
        torch.testing.assert_close(decoded, painted, rtol=0, atol=0.01)
        torch.testing.assert_close(decoded_bf16, painted, rtol=0, atol=0.03)
        assert (decoded - x[:, :, 0]).abs().mean() < 0.05  # the picture on disk, blockier at the shapes' edges


def test_the_demos_blind_text_encoder_embeds_the_instruction_but_nothing_of_the_pictures(tmp_path):
    """`make demo`'s text encoder (`blind_text_encoder`): two different pictures with one instruction give the
    same prompt embedding, and two instructions with one picture different ones, so the demo's edit can only
    be learnt from the reference latents (what its learning test needs to catch references packed out of
    order). The tests' own tiny encoder sees the pictures."""
    from PIL import Image

    from demo.tiny_model import write_tiny_model

    def embeds(pipeline, colour: str, prompt: str) -> torch.Tensor:
        image = Image.new("RGB", (64, 64), colour)
        return pipeline.encode_prompt(prompt, image=[image], device="cpu")[0]

    for blind in (True, False):
        path = write_tiny_model(tmp_path / str(blind), "edit-v2", blind_text_encoder=blind)
        pipeline = QwenImageEditPlusPipeline.from_pretrained(path)
        red, blue = embeds(pipeline, "red", "make it blue"), embeds(pipeline, "blue", "make it blue")
        assert torch.equal(red, blue) == blind
        assert not torch.equal(red, embeds(pipeline, "red", "make it green"))
