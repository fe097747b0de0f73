"""Both stages on demo-sized data: build the cache, train with the raw images gone, load the LoRA in diffusers."""

from __future__ import annotations

import shutil

import PIL.Image
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
from safetensors.torch import load_file

from prep.build import build_cache
from shared.cache import CacheStore
from shared.config import load_config
from shared.flavours import FLAVOURS
from tests.cache_files import manifest_rows
from train.loop import train

PIPELINES = {
    "edit-v1": QwenImageEditPipeline,
    "edit-v2": QwenImageEditPlusPipeline,
    "edit-v2+": QwenImageEditPlusPipeline,
    "edit-v3": QwenImageEditPlusPipeline,
}


def _transformer_output(transformer: torch.nn.Module) -> torch.Tensor:
    """The transformer's prediction on fixed inputs: 4x4 target tokens + 4x4 reference tokens."""
    g = torch.Generator().manual_seed(0)
    channels = transformer.config.in_channels
    text_dim = transformer.config.joint_attention_dim
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 32, channels, generator=g),
            encoder_hidden_states=torch.randn(1, 7, text_dim, generator=g),
            timestep=torch.tensor([0.5]),
            img_shapes=[[(1, 4, 4), (1, 4, 4)]],
            return_dict=False,
        )[0]


@pytest.mark.parametrize("flavour", ["edit-v1", "edit-v2", "edit-v2+", "edit-v3"])
def test_prep_then_train_then_load_lora(flavour, demo_project, tmp_path, monkeypatch):
    train_keys = {"max_train_steps": 1}  # one step (no warm-up) moves every lora_B off zero: all that is read
    if flavour == "edit-v2+":  # one flavour trains with SimpleTuner's random reference sampling
        train_keys["conditioning_multidataset_sampling"] = "random"
    config = load_config(demo_project(flavour, n_samples=4, train=train_keys))
    (cache,) = build_cache(config, device="cpu")

    info = CacheStore(cache).read_info()
    rows = manifest_rows(cache)
    assert info["flavour"] == flavour and info["counts"]["samples"] == 4 == len(rows)
    assert all(len(r["ref_sizes"]) == (1 if flavour == "edit-v1" else 2) for r in rows)

    # train reads only the cache: delete the raw dataset and make any image decode fail loudly.
    shutil.rmtree(tmp_path / "data")

    def no_images(*args, **kwargs):
        raise AssertionError("train opened an image file")

    monkeypatch.setattr(PIL.Image, "open", no_images)
    lora_path = train(config)
    monkeypatch.undo()

    state = load_file(lora_path)
    assert state and all(k.startswith("transformer.") and ".lora_" in k for k in state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k), "training left lora_B at zero"

    model = config.train.pretrained_model_name_or_path
    if FLAVOURS[flavour].zero_cond_t:  # edit-v2+ sets the 2511 flag on 2509 weights; edit-v3's config has it
        transformer = QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer", zero_cond_t=True)
        pipe = PIPELINES[flavour].from_pretrained(model, transformer=transformer)
        assert pipe.transformer.config.zero_cond_t
    else:
        pipe = PIPELINES[flavour].from_pretrained(model)
    before = _transformer_output(pipe.transformer)
    pipe.load_lora_weights(lora_path.parent)
    after = _transformer_output(pipe.transformer)
    assert not torch.allclose(before, after), "the LoRA did not change the transformer's output"
    # alpha is honoured: rank 4, alpha 8 -> scale 2.
    scales = {m.scaling["default_0"] for m in pipe.transformer.modules() if hasattr(m, "scaling") and m.scaling}
    assert scales == {2.0}
