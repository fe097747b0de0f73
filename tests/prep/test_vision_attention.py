"""The vision tower with its windows batched by size gives the embeddings transformers' per-window SDPA gives."""

import numpy as np
import torch
from PIL import Image

import prep.vision_attention as vision_attention
from prep.encode import Encoders
from shared.flavours import FLAVOURS
from shared.models import load_processor, load_text_encoder, load_vae


def test_grouped_windows_equal_per_window_attention_with_far_fewer_calls(tiny_models, monkeypatch):
    model = str(tiny_models["edit-v1"])
    processor = load_processor(model)
    rng = np.random.default_rng(0)
    # Two images of one shape and one of another: windows of several sizes (edges), two sequences.
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(300, 420)] * 2 + [(224, 224)]
    ]
    inputs = processor.image_processor(images=images, return_tensors="pt")
    per_window = load_text_encoder(model, torch.float32)
    expected = per_window.get_image_features(**inputs, return_dict=True).pooler_output

    calls = []
    sdpa = vision_attention.scaled_dot_product_attention
    monkeypatch.setattr(
        vision_attention, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    encoders = Encoders(
        model, FLAVOURS["edit-v1"], modules=(load_vae(model), load_text_encoder(model, torch.float32), processor)
    )
    assert encoders.text_encoder.config.text_config._attn_implementation == "sdpa"  # the language model unchanged
    got = encoders.encode_images([dict(inputs)])[0]

    assert not vision_attention._GROUPS  # the per-forward grouping went with its bounds tensors
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        assert torch.equal(ours, theirs)
    grid = inputs["image_grid_thw"]  # [3, (t, h, w)] in patches; windows are 8x8 patches
    windows = sum(-(-int(h) // 8) * -(-int(w) // 8) for _, h, w in grid)
    depth = per_window.config.vision_config.depth
    assert 0 < len(calls) < windows * depth / 3  # one call per window size, not per window


def test_encoders_attend_without_cudnn_attention_and_leave_the_choice_as_they_found_it(tiny_models, monkeypatch):
    """cuDNN's attention builds a graph per new shape, which a cache build meets all along (prep/encode.py):
    every attention call while encoding runs with it off, and only while encoding."""
    model = str(tiny_models["edit-v1"])
    processor = load_processor(model)
    modules = (load_vae(model, torch.float32), load_text_encoder(model, torch.float32), processor)
    encoders = Encoders(model, FLAVOURS["edit-v1"], dtype=torch.float32, modules=modules)
    cudnn_on = []

    def recording(sdpa):
        return lambda *a, **k: cudnn_on.append(torch.backends.cuda.cudnn_sdp_enabled()) or sdpa(*a, **k)

    monkeypatch.setattr(
        vision_attention, "scaled_dot_product_attention", recording(vision_attention.scaled_dot_product_attention)
    )
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", recording(torch.nn.functional.scaled_dot_product_attention)
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8))
    encoders.encode_images([dict(processor.image_processor(images=[image], return_tensors="pt"))])
    encoders.encode_pixels(torch.randint(0, 256, (1, 3, 1, 64, 64), dtype=torch.uint8))

    assert cudnn_on and not any(cudnn_on)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored for whatever runs after (training keeps cuDNN)
