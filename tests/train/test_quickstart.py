"""SimpleTuner's Qwen Image Edit quickstart (../shared/reference), its configs as the guide writes them: they
validate, build a cache and train on the tiny model. Only the dataset folders, the model (the tiny one) and
the run's length (steps, preview steps, the held-out loss's σ values) differ from the guide's text."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from demo.data import write_demo_dataset
from prep.build import build_cache
from prep.validate import validate
from shared.config import load_config
from train.loop import train

# The guide's config.json, comments included (section 2); the run, its previews and its held-out loss shortened
# (a key given twice with different values is refused, so the guide's 30 preview steps are replaced in place; the
# held-out loss at 2 σ values, not the default 8, is a key the guide leaves out, added at the end).
CONFIG = """{
  "model_type": "lora",
  "model_family": "qwen_image",
  "model_flavour": "FLAVOUR",      // or "edit-v2"
  "train_batch_size": 1,
  "gradient_accumulation_steps": 4,
  "validation_resolution": "1024x1024",
  "validation_guidance": 4.0,
  "validation_num_inference_steps": PREVIEW_STEPS,
  "mixed_precision": "bf16",
  "gradient_checkpointing": true,
  "base_model_precision": "int8-quanto",
  "quantize_via": "cpu",
  "quantize_activations": false,
  "flow_schedule_shift": 1.73,
  "data_backend_config": "ROOT/multidatabackend.json",
  EXTRA
  "pretrained_model_name_or_path": "MODEL",
  "output_dir": "ROOT/output",
  "max_train_steps": 1,
  "eval_timesteps": 2
}
"""

# Section 3.1 (edit-v1): the main dataset, its reference, and the embeds cache entry SimpleTuner needs.
EDIT_V1_BACKEND = """[
  {
    "id": "qwen-edit-images",
    "type": "local",
    "instance_data_dir": "DATA/images",
    "caption_strategy": "textfile",
    "resolution": 1024,
    "conditioning_data": ["qwen-edit-reference"],
    "conditioning_image_embeds": "qwen-edit-ref-embeds",
    "cache_dir_vae": "ROOT/cache/vae/qwen-edit-images"
  },
  {
    "id": "qwen-edit-reference",
    "type": "local",
    "dataset_type": "conditioning",
    "instance_data_dir": "DATA/reference",
    "conditioning_type": "reference_strict",
    "resolution": 1024,
    "cache_dir_vae": "ROOT/cache/vae/qwen-edit-reference"
  },
  {
    "id": "qwen-edit-ref-embeds",
    "type": "local",
    "dataset_type": "conditioning_image_embeds",
    "cache_dir": "ROOT/cache/conditioning_image_embeds/qwen-edit"
  }
]
"""

# Section 3.2 (edit-v2, two of its three references) with section 5's dedicated eval dataset.
EDIT_V2_BACKEND = """[
  {
    "id": "qwen-edit-plus-images",
    "type": "local",
    "instance_data_dir": "DATA/images",
    "caption_strategy": "textfile",
    "resolution": 1024,
    "conditioning_data": [
      "qwen-edit-plus-reference-a",
      "qwen-edit-plus-reference-b"
    ],
    "cache_dir_vae": "ROOT/cache/vae/qwen-edit-plus/images"
  },
  {
    "id": "qwen-edit-plus-reference-a",
    "type": "local",
    "dataset_type": "conditioning",
    "instance_data_dir": "DATA/reference",
    "conditioning_type": "reference_strict",
    "resolution": 1024,
    "cache_dir_vae": "ROOT/cache/vae/qwen-edit-plus/ref_a"
  },
  {
    "id": "qwen-edit-plus-reference-b",
    "type": "local",
    "dataset_type": "conditioning",
    "instance_data_dir": "DATA/reference2",
    "conditioning_type": "reference_strict",
    "resolution": 1024,
    "cache_dir_vae": "ROOT/cache/vae/qwen-edit-plus/ref_b"
  },
  {
    "id": "qwen-edit-val",
    "type": "local",
    "instance_data_dir": "EVAL/images",
    "caption_strategy": "textfile",
    "resolution": 1024,
    "conditioning_data": ["qwen-edit-val-reference-a", "qwen-edit-val-reference-b"],
    "cache_dir_vae": "ROOT/cache/vae/qwen-edit-plus/val"
  },
  {
    "id": "qwen-edit-val-reference-a",
    "type": "local",
    "dataset_type": "conditioning",
    "instance_data_dir": "EVAL/reference",
    "conditioning_type": "reference_strict",
    "resolution": 1024
  },
  {
    "id": "qwen-edit-val-reference-b",
    "type": "local",
    "dataset_type": "conditioning",
    "instance_data_dir": "EVAL/reference2",
    "conditioning_type": "reference_strict",
    "resolution": 1024
  }
]
"""
EDIT_V2_EXTRA = """"model_kwargs": {
    "match_target_res": true
  },
  "eval_dataset_id": "qwen-edit-val","""


def _write(root: Path, model: Path, flavour: str) -> Path:
    # edit-v1: eval samples held out of the training pairs (eval_holdout: at most 1 in 8, so 8 pairs); edit-v2: its
    # eval dataset, so one training pair does (batch 1: each of the 4 accumulated micro-batches is that pair). At the
    # guide's 1024² every pair costs seconds to encode on CPU.
    data = write_demo_dataset(root / "data", n_samples=8 if flavour == "edit-v1" else 1)
    evals = write_demo_dataset(root / "eval", n_samples=1, seed=1)
    if flavour != "edit-v1":  # a second reference; the guide's are all strict: the target's aspect ratio
        for folder in (data, evals):
            shutil.copytree(folder / "reference", folder / "reference2")
    backend = EDIT_V1_BACKEND if flavour == "edit-v1" else EDIT_V2_BACKEND
    extra = "" if flavour == "edit-v1" else EDIT_V2_EXTRA
    fill = {
        "PREVIEW_STEPS": "2",
        "ROOT": str(root),
        "DATA": str(data),
        "EVAL": str(evals),
        "MODEL": str(model),
        "FLAVOUR": flavour,
    }
    text, backend_text = CONFIG.replace("EXTRA", extra), backend
    for key, value in fill.items():
        text, backend_text = text.replace(key, value), backend_text.replace(key, value)
    (root / "multidatabackend.json").write_text(backend_text)
    (root / "config.json").write_text(text)
    return root / "config.json"


@pytest.mark.parametrize("flavour", ["edit-v1", "edit-v2"])
def test_the_quickstarts_configs_validate_build_and_train(flavour, tiny_models, tmp_path):
    config = load_config(_write(tmp_path, tiny_models[flavour], flavour))
    assert config.train.validation_resolution == 1024
    report = validate(config)
    assert not [f for f in report.findings if f.severity == "error"]
    caches = build_cache(config, device="cpu")
    assert caches
    lora = train(config)
    assert lora.is_file()
    assert list((tmp_path / "output" / "previews").glob("step-000001*.png"))  # eval samples previewed
