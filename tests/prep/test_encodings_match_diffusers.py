"""The cache holds what diffusers' pipelines compute at inference for the same image and instruction."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions as v1_dims
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as v2_dims
from PIL import Image

from prep.build import build_cache
from shared.cache import Latents
from shared.config import load_config
from tests.cache_files import manifest_rows, member_bytes, sample_embeddings
from tests.conftest import write_config


def _image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _dataset(root, size, n_refs, caption):
    """One pair whose images already have their bucket's size, so prep neither resizes nor crops."""
    folders = ["reference"] + [f"reference{i + 1}" for i in range(1, n_refs)]
    for sub in ["images", *folders]:
        (root / sub).mkdir(parents=True)
    _image(*size, seed=0).save(root / "images" / "a.png")
    (root / "images" / "a.txt").write_text(caption + "\n")
    for i, folder in enumerate(folders):
        _image(*size, seed=i + 1).save(root / folder / "a.png")
    return root


def _cached(config_path):
    config = load_config(config_path)
    (cache,) = build_cache(config, device="cpu")
    (row,) = manifest_rows(cache)
    latents = Latents.from_bytes(member_bytes(cache, row, "latents.safetensors"))
    target, refs = latents.target, latents.references
    embeds = sample_embeddings(cache, row)
    return target, refs, embeds


def _vae(pipe, image: Image.Image, width: int, height: int) -> torch.Tensor:
    pixels = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
    return pipe._encode_vae_image(pixels, generator=None)[0, :, 0]


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.to(torch.bfloat16).float(), rtol=1.6e-2, atol=1e-2)


def test_edit_v1_cache_equals_qwen_image_edit_pipeline(tmp_path, tiny_models):
    caption = "make the circle red"
    size = (288, 224)  # the bucket of a 288x224 image at resolution 256
    data = _dataset(tmp_path / "data", size, n_refs=1, caption=caption)
    config = write_config(tmp_path, tiny_models["edit-v1"], "edit-v1", data, n_refs=1, resolution=256)
    target, (ref,), embeds = _cached(config)

    pipe = QwenImageEditPipeline.from_pretrained(tiny_models["edit-v1"])
    reference = Image.open(data / "reference" / "a.png").convert("RGB")
    # What QwenImageEditPipeline.__call__ hands encode_prompt: the reference resized to ~1 MP.
    width, height, _ = v1_dims(1024 * 1024, reference.width / reference.height)
    with torch.no_grad():
        prompt_embeds, mask = pipe.encode_prompt(caption, image=pipe.image_processor.resize(reference, height, width))
        assert mask is None  # one prompt, no padding
        _assert_close(embeds["prompt.0"], prompt_embeds[0])
        _assert_close(target, _vae(pipe, Image.open(data / "images" / "a.png").convert("RGB"), *size))
        _assert_close(ref, _vae(pipe, reference, *size))  # reference_strict: the target's size


@pytest.mark.parametrize("flavour", ["edit-v2", "edit-v3"])  # edit-v3 (2511) encodes as 2509 does
def test_plus_flavour_cache_equals_qwen_image_edit_plus_pipeline(tmp_path, tiny_models, flavour):
    caption = "paint the square of picture 1 in the colour of picture 2"
    size = (256, 256)
    data = _dataset(tmp_path / "data", size, n_refs=2, caption=caption)
    # Every dataset at 256 (strict references): the Plus pipeline still encodes references at ~1 MP.
    config = write_config(
        tmp_path, tiny_models[flavour], flavour, data, n_refs=2, resolution=256, train={"model_kwargs": {}}
    )
    target, refs, embeds = _cached(config)

    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_models[flavour])
    references = [Image.open(data / f / "a.png").convert("RGB") for f in ("reference", "reference2")]
    condition_images, vae_sizes = [], []
    for image in references:  # as QwenImageEditPlusPipeline.__call__ prepares its images
        cw, ch = v2_dims(CONDITION_IMAGE_SIZE, image.width / image.height)
        condition_images.append(pipe.image_processor.resize(image, ch, cw))
        vae_sizes.append(v2_dims(VAE_IMAGE_SIZE, image.width / image.height))
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt(caption, image=condition_images)
        _assert_close(embeds["prompt.0"], prompt_embeds[0])
        _assert_close(target, _vae(pipe, Image.open(data / "images" / "a.png").convert("RGB"), *size))
        assert len(refs) == 2
        for ours, image, (w, h) in zip(refs, references, vae_sizes, strict=True):
            assert (w, h) == (1024, 1024)
            _assert_close(ours, _vae(pipe, image, w, h))


def test_random_sampling_caches_each_reference_alone_as_the_plus_pipeline_encodes_it(tmp_path, tiny_models):
    """SimpleTuner's conditioning_multidataset_sampling random trains a sample with one reference dataset's image:
    each train sample then holds, per reference, the embeddings the Plus pipeline computes given that one image."""
    caption = "make picture 1 look like a postcard"
    data = _dataset(tmp_path / "data", (256, 256), n_refs=2, caption=caption)
    config = write_config(
        tmp_path,
        tiny_models["edit-v2"],
        "edit-v2",
        data,
        n_refs=2,
        resolution=256,
        train={"conditioning_multidataset_sampling": "random"},
    )
    _, refs, embeds = _cached(config)
    assert len(refs) == 2 and "prompt.0" not in embeds and "dropout" not in embeds

    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_models["edit-v2"])
    for r, folder in enumerate(("reference", "reference2")):
        image = Image.open(data / folder / "a.png").convert("RGB")
        cw, ch = v2_dims(CONDITION_IMAGE_SIZE, image.width / image.height)
        with torch.no_grad():
            alone, _ = pipe.encode_prompt(caption, image=[pipe.image_processor.resize(image, ch, cw)])
            empty, _ = pipe.encode_prompt("", image=[pipe.image_processor.resize(image, ch, cw)])
        _assert_close(embeds[f"ref.{r}.prompt.0"], alone[0])
        _assert_close(embeds[f"ref.{r}.dropout"], empty[0])


def test_batched_vl_encoding_with_padding_equals_one_at_a_time(tiny_models):
    """Texts of different lengths sharing one pass of the vision tower encode as each would alone
    through the whole text encoder, as the pipelines call it (processor, then text_encoder)."""
    from prep.encode import Encoders
    from prep.sample_records import SamplePreparer
    from shared.flavours import FLAVOURS

    flavour = FLAVOURS["edit-v2"]
    encoders = Encoders(str(tiny_models["edit-v2"]), flavour, dtype=torch.float32)
    preparer = SamplePreparer(flavour, encoders.processor, 8, False, 0, {"negative_prompt": "", "resolution": 0})
    images = [_image(96, 64, seed=3), _image(64, 64, seed=4)]
    texts = ["red", "make the big square in picture 1 look like the colour of picture 2, please"]
    image_set = preparer.vl_images(images)
    tokenised = [preparer.vl_text(t, image_set, 0) for t in texts]
    vision = encoders.encode_images([image_set])[0]
    batched = encoders.encode_vl(tokenised, [vision, vision], [image_set["image_grid_thw"]] * 2)
    assert batched[0].shape[0] < batched[1].shape[0]
    for one, text, tokens in zip(batched, texts, tokenised, strict=True):
        # the processor's own output, as the pipelines compute it, equals our split of it
        full = encoders.processor(text=[flavour.vl_text(text, 2)], images=images, padding=True, return_tensors="pt")
        assert torch.equal(full["input_ids"], tokens["input_ids"])
        assert torch.equal(full["attention_mask"], tokens["attention_mask"])
        assert torch.equal(full["pixel_values"], image_set["pixel_values"])
        assert torch.equal(full["image_grid_thw"], image_set["image_grid_thw"])
        with torch.no_grad():  # the call _get_qwen_prompt_embeds makes
            keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
            hidden = encoders.text_encoder(**{k: full[k] for k in keys}, output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(one, hidden[flavour.drop_tokens :], rtol=1e-4, atol=1e-4)


def test_eval_sample_negative_equals_the_pipelines_negative_prompt_encoding(tmp_path, tiny_models):
    """An eval sample's `negative` is validation_negative_prompt encoded with its reference, as
    QwenImageEditPipeline encodes `negative_prompt` for true CFG."""
    size = (288, 224)
    data = _dataset(tmp_path / "data", size, n_refs=1, caption="make the circle red")
    keys = {"eval_dataset_id": "edits", "validation_negative_prompt": "blurry, ugly"}
    config = write_config(tmp_path, tiny_models["edit-v1"], "edit-v1", data, n_refs=1, resolution=256, train=keys)
    _, _, embeds = _cached(config)
    assert "dropout" not in embeds

    pipe = QwenImageEditPipeline.from_pretrained(tiny_models["edit-v1"])
    reference = Image.open(data / "reference" / "a.png").convert("RGB")
    width, height, _ = v1_dims(1024 * 1024, reference.width / reference.height)
    with torch.no_grad():
        negative, _ = pipe.encode_prompt("blurry, ugly", image=pipe.image_processor.resize(reference, height, width))
    _assert_close(embeds["negative"], negative[0])


def test_vae_pixels_travel_as_uint8_and_scale_bit_for_bit_as_the_pipelines_processor(tiny_models):
    """Workers hand the VAE its pixels as uint8 (a quarter of the bytes); scaled on the encoders' device they
    equal the float32 pixels diffusers' VaeImageProcessor makes, resize included."""
    from diffusers.image_processor import VaeImageProcessor

    from prep.encode import to_signed_unit
    from prep.sample_records import SamplePreparer
    from shared.flavours import FLAVOURS
    from shared.models import load_processor

    preview = {"negative_prompt": "", "resolution": 0}
    preparer = SamplePreparer(FLAVOURS["edit-v1"], load_processor(str(tiny_models["edit-v1"])), 8, False, 0, preview)
    theirs = VaeImageProcessor(vae_scale_factor=16)  # the pipelines': 8 x 2 (latents are packed 2x2)
    for (width, height), size in [((320, 240), (256, 192)), ((97, 131), (128, 160)), ((64, 64), (64, 64))]:
        image = _image(width, height, seed=width)
        ours = preparer.vae_pixels(image, *size[::-1])
        assert ours.dtype == torch.uint8 and ours.shape == (1, 3, 1, *size[::-1])
        assert torch.equal(to_signed_unit(ours), theirs.preprocess(image, *size[::-1]).unsqueeze(2))
