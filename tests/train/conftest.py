"""What the training tests share: one built edit-v1 cache per test run (per xdist worker), only read, and a factory
of configs over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo.data import write_demo_dataset
from prep.build import build_cache
from shared.config import load_config
from tests.conftest import write_config

BASE = {
    "train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "learning_rate": 1e-3,
    "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 2,
    "lora_dropout": 0.1,
    "use_ema": True,
    "ema_decay": 0.9,
    "caption_dropout_probability": 0.3,
    "dataloader_num_workers": 0,
    "checkpointing_steps": 2,
    "base_model_precision": "int8-quanto",
    # previews (step 0 and the end, LoRA and EMA) at 2 Euler steps, not 30: no test over this cache counts them,
    # and at 30 they were most of each run's time
    "validation_num_inference_steps": 2,
}


@pytest.fixture(scope="session")
def project(tmp_path_factory, tiny_models):
    """A built edit-v1 cache of 12 samples (with caption-dropout embeddings) and a factory of configs over it."""
    root = tmp_path_factory.mktemp("training")
    data = write_demo_dataset(root / "data", n_samples=12, n_references=1)
    config_path = write_config(root, tiny_models["edit-v1"], "edit-v1", data, 1, train=BASE)
    build_cache(load_config(config_path), device="cpu")

    def make(out: Path, **overrides) -> Path:
        config = json.loads(config_path.read_text())
        config.update(overrides, output_dir=str(out))
        path = out.with_suffix(".json")
        path.write_text(json.dumps(config))
        return path

    return make


# For runs whose test reads neither previews nor the EMA: no previews (the held-out loss still runs, at 1 σ instead
# of 8), no EMA. A short run spent most of its time rendering the step-0, last and EMA previews.
QUICK = {"validation_disable": True, "use_ema": False, "eval_timesteps": 1}

# Memory levers for the stopped-and-resumed run: the straight run uses none (CPU: nothing checkpointed).
LEVERS = {"gradient_checkpointing": True, "blocks_to_swap": 1, "offload_activations": True}
