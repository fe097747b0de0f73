"""Previews: the same latents as diffusers' pipelines, made inside training without the encoders."""

from __future__ import annotations

import csv
from pathlib import Path

import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from peft import LoraConfig
from transformers import Qwen2_5_VLForConditionalGeneration

import train.evaluation.validator as validation_module
from drawing.preview_grid import read_png
from prep.build import build_cache
from shared.config import load_config
from train.evaluation.eval_set import EvalSample
from train.evaluation.sampling import sample_latents
from train.loop import train
from train.packing import pack_latents

PIPELINES = {"edit-v1": QwenImageEditPipeline, "edit-v2": QwenImageEditPlusPipeline}


def _lora_transformer(model_dir) -> torch.nn.Module:
    """The tiny transformer (fp32) with a LoRA whose B is not zero, so the LoRA changes the output."""
    transformer = QwenImageTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "add_k_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2, generator=g)
    return transformer.eval()


def test_base_model_previews_compute_what_peft_computes_with_the_adapters_off(tiny_models):
    """`lora_disabled` zeroes the LoRA's up-projections (so compiled previews need no graphs of their own): the same
    output as peft's `disable_adapters`, bit for bit, and the LoRA's own weights back afterwards."""
    transformer = _lora_transformer(tiny_models["edit-v1"])
    params = {name: p for name, p in transformer.named_parameters() if "lora_" in name}
    before = {name: p.detach().clone() for name, p in params.items()}
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 2 * 16, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 4, 4), (1, 4, 4)]],
        return_dict=False,
    )
    with torch.no_grad():
        with_lora = transformer(**inputs)[0]
        transformer.disable_adapters()
        want = transformer(**inputs)[0]
        transformer.enable_adapters()
        with validation_module.lora_disabled(params):
            base = transformer(**inputs)[0]
    assert torch.equal(base, want) and not torch.equal(base, with_lora)
    assert all(torch.equal(p, before[name]) for name, p in params.items())


@pytest.mark.parametrize("flavour", ["edit-v1", "edit-v2"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_preview_latents_equal_the_diffusers_pipeline(tiny_models, flavour, guidance):
    """Same transformer + LoRA, embeddings, reference latents, seed, steps and guidance: the pipeline's latents.

    The pipelines take reference images; their VAE encoding is replaced by the cached latents (the cache's
    own parity with `_encode_vae_image` is tested in tests/prep). Tolerance: 1e-6 absolute, fp32 on CPU
    (measured: equal). 2 sampling steps, not more: every step after the first takes the same path (the
    scheduler's step index, the shift, true CFG), and at 1024² references each step is seconds.
    """
    model_dir = tiny_models[flavour]
    transformer = _lora_transformer(model_dir)
    g = torch.Generator().manual_seed(0)
    n_refs = 1 if flavour == "edit-v1" else 2
    # The pipelines size references at ~1 MP (1024x1024 for a square image): latents 128 x 128.
    references = [torch.randn(16, 128, 128, generator=g) for _ in range(n_refs)]
    sample = EvalSample(
        index=0,
        sample_id="0" * 20,
        label="edits/a.png",
        instruction="make it red",
        target=torch.zeros(16, 48, 64),  # the output size: 384 x 512 pixels
        references=references,
        prompt=torch.randn(11, 32, generator=g),
        negative=torch.randn(7, 32, generator=g),
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    ours = sample_latents(transformer, scheduler, sample, 2, guidance, 1234, torch.device("cpu"), torch.float32)

    pipe = PIPELINES[flavour].from_pretrained(model_dir, transformer=transformer, torch_dtype=torch.float32)
    cached = iter(references)
    pipe._encode_vae_image = lambda image, generator: next(cached)[None, :, None]  # [1, C, 1, h, w]
    theirs = pipe(
        image=[PIL.Image.new("RGB", (1024, 1024))] * n_refs if n_refs > 1 else PIL.Image.new("RGB", (1024, 1024)),
        prompt_embeds=sample.prompt[None],
        prompt_embeds_mask=torch.ones(1, 11, dtype=torch.long),
        negative_prompt_embeds=sample.negative[None] if guidance > 1 else None,
        negative_prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long) if guidance > 1 else None,
        true_cfg_scale=guidance,
        height=384,
        width=512,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(1234),
        output_type="latent",
    ).images  # [1, N, 4C] packed
    assert theirs.shape == (1, 24 * 32, 64)
    torch.testing.assert_close(pack_latents(ours[None]), theirs, rtol=0, atol=1e-6)


def test_training_previews_without_the_encoders(demo_project, monkeypatch):
    """`train run` leaves preview grids (step 0 with the LoRA off, the middle, the end, and the EMA's) and a
    held-out loss curve, loading neither the text encoder nor the VAE encoder."""
    train_keys = {
        "max_train_steps": 4,
        "eval_holdout": 2,
        "validation_step_interval": 2,
        "validation_num_inference_steps": 2,
        "eval_timesteps": 1,  # the held-out loss at 1 σ, not 8: only its presence and sign are read
        "use_ema": True,
        "report_to": "tensorboard",
    }
    # 4 samples: the 2 held out (the previews' rows) and 2 to train on, all this reads
    config = load_config(demo_project("edit-v2", n_samples=4, train=train_keys))
    build_cache(config, device="cpu")

    def refuse(*args, **kwargs):
        raise AssertionError("training loaded an encoder")

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "from_pretrained", refuse)
    monkeypatch.setattr(AutoencoderKLQwenImage, "from_pretrained", refuse)
    monkeypatch.setattr(AutoencoderKLQwenImage, "encode", refuse)
    vaes = []
    real_loader = validation_module.load_vae_decoder

    def keep(*args, **kwargs):
        vaes.append(real_loader(*args, **kwargs))
        return vaes[-1]

    monkeypatch.setattr(validation_module, "load_vae_decoder", keep)
    train(config)
    monkeypatch.undo()

    (vae,) = vaes
    encoder = [p for name, p in vae.named_parameters() if name.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(p.is_meta for p in encoder), "the VAE encoder holds weights"
    assert all(not p.is_meta for p in vae.decoder.parameters())

    out = Path(config.train.output_dir)
    previews = sorted(p.name for p in (out / "previews").glob("*.png"))
    assert previews == [
        "before-after.png",
        "step-000000-base.png",
        "step-000002-ema.png",
        "step-000002.png",
        "step-000004-ema.png",
        "step-000004.png",
    ]
    # per eval sample: its row (references | output | ground truth, the instruction under it), and the output
    # and ground truth alone at the sample's full size
    folder = out / "previews" / "step-000004"
    rows = sorted(p for p in folder.glob("*.png") if p.suffixes == [".png"])
    assert len(rows) == 2
    for row_path in rows:
        with PIL.Image.open(row_path) as row:
            assert row.width > 3 * 64  # two references, output, ground truth side by side
        with PIL.Image.open(row_path.with_suffix(".output.png")) as output:
            with PIL.Image.open(row_path.with_suffix(".target.png")) as target:
                assert output.size == target.size and output.height < row.height
    # before/after: per eval sample the base model's output (step 0) beside the last step's, one panel more
    with PIL.Image.open(out / "previews" / "before-after.png") as before_after:
        with PIL.Image.open(out / "previews" / "step-000004.png") as last_grid:
            assert before_after.width > last_grid.width and before_after.height >= last_grid.height
    # eval_log.csv: the held-out loss and the previews' pixel error at every step that measured them
    with open(out / "eval_log.csv", newline="") as f:
        logged = list(csv.DictReader(f))
    assert [r["step"] for r in logged] == ["0", "2", "4"]
    assert all(0 < float(r["heldout_loss"]) and 0 <= float(r["preview_error"]) <= 1 for r in logged)
    assert [r["preview_error_ema"] == "" for r in logged] == [True, False, False]  # no EMA previews at step 0
    # The EMA previews render the EMA weights, which lag the live ones: their outputs differ (one autocast
    # around both once kept the live weights' bf16 copies, and the "EMA" previews were the live ones).
    live, ema = (sorted((out / "previews" / step).glob("*.output.png")) for step in ("step-000004", "step-000004-ema"))
    assert any(read_png(a).tolist() != read_png(b).tolist() for a, b in zip(live, ema, strict=True))
    with PIL.Image.open(out / "loss.png") as chart:
        assert chart.height > 700  # the pixel error's panel under the loss chart
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
