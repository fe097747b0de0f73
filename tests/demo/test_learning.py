"""The demo learns: on `make demo`'s own setup (demo/project.py: its tiny models, toy recolouring pairs and
configs/demo-*), training takes the held-out previews' pixel error to at most half the base model's.

The previews are sampled by the inference path (train/evaluation/sampling.py: the pipelines' σ schedule, Euler steps,
the references packed after the target in their order) from what the training path learnt
(train/objective.py: the velocity noise − x0, references packed the same way), so this fails when the two
disagree: scratch runs with the target's sign flipped in training, the two references swapped at sampling,
or the sampler's σ schedule started at 0.5 each ended above half (README, "The demo learns").
"""

from __future__ import annotations

import csv

import pytest

from demo.project import FLAVOURS, demo_config, write_demo
from prep.build import build_cache
from shared.config import load_config
from train.loop import train


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_demo_halves_the_base_models_preview_error_on_held_out_pairs(flavour, tmp_path):
    write_demo(tmp_path, flavours=(flavour,))
    config = load_config(demo_config(flavour, tmp_path))
    build_cache(config, device="cpu")
    train(config)
    with open(tmp_path / "output" / flavour / "eval_log.csv") as log:
        rows = [row for row in csv.DictReader(log) if row["preview_error"]]
    base, last = rows[0], rows[-1]
    assert (base["step"], last["step"]) == ("0", str(config.train.max_train_steps))
    assert float(last["preview_error"]) <= 0.5 * float(base["preview_error"]), rows
