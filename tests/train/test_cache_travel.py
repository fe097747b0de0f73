"""Caches travel between machines: the encoders are named by content, not by the model's path, and a training
node needs only the transformer, the VAE and the scheduler of the model, wherever they lie."""

from __future__ import annotations

import json
import shutil

import pytest

from demo.data import write_demo_dataset
from prep.build import build_cache
from shared.config import load_config
from shared.errors import UserError
from tests.conftest import write_config
from train.loop import train

TRAIN = {
    "eval_holdout": 2,
    "max_train_steps": 1,
    "validation_step_interval": 1,
    "validation_num_inference_steps": 2,
    "dataloader_num_workers": 0,
}


def with_model(config_path, model, out):
    """A copy of the config at `config_path` (under `out`) reading the model at `model`, training into `out`."""
    config = json.loads(config_path.read_text())
    config["pretrained_model_name_or_path"] = str(model)
    config["output_dir"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    return out / "config.json"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_models):
    """A cache built with the tiny model where prep found it, once for the module (the tests only read it, each
    through its own copy of the config); the model's hashes remembered in the module's own XDG_CACHE_HOME."""
    root = tmp_path_factory.mktemp("travel")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("XDG_CACHE_HOME", str(root / "home-cache"))
        data = write_demo_dataset(root / "data", n_samples=6, n_references=1)
        config_path = write_config(root, tiny_models["edit-v1"], "edit-v1", data, 1, train=TRAIN)
        build_cache(load_config(config_path), device="cpu")
        yield config_path


def test_the_same_model_at_another_path_finds_the_cache_up_to_date(built, tmp_path, tiny_models, capsys):
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_models["edit-v1"], moved)
    capsys.readouterr()
    build_cache(load_config(with_model(built, moved, tmp_path / "output")), device="cpu")
    assert "up to date" in capsys.readouterr().out


def test_a_training_node_with_only_transformer_vae_and_scheduler_trains_with_previews(built, tmp_path, tiny_models):
    node = tmp_path / "node" / "model"  # another path, no text_encoder/, tokenizer/ or processor/
    for part in ("transformer", "vae", "scheduler"):
        shutil.copytree(tiny_models["edit-v1"] / part, node / part)
    lora = train(load_config(with_model(built, node, tmp_path / "output")))
    assert lora.is_file()
    output = tmp_path / "output"
    assert (output / "previews" / "step-000000-base.png").is_file()
    assert (output / "previews" / "step-000001.png").is_file()


def test_a_vae_other_than_the_one_that_encoded_the_cache_is_refused_naming_it(built, tmp_path, tiny_models):
    node = tmp_path / "node" / "model"
    for part in ("transformer", "vae", "scheduler"):
        shutil.copytree(tiny_models["edit-v1"] / part, node / part)
    vae_config = json.loads((node / "vae" / "config.json").read_text())
    vae_config["latents_std"] = [s * 2 for s in vae_config["latents_std"]]  # latents would be scaled otherwise
    (node / "vae" / "config.json").write_text(json.dumps(vae_config))
    with pytest.raises(UserError, match=r"built with other prep settings .*\(changed: vae_config\)"):
        train(load_config(with_model(built, node, tmp_path / "output")))
