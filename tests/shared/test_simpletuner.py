"""SimpleTuner's keys, written as its documents write them, mean what they mean there (or the run says so)."""

import json
import math

import pytest

from shared.config import load_config
from shared.config_report import notes

EDITS = {"id": "edits", "instance_data_dir": "/data/images", "conditioning_data": ["refs"]}
REFS = {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": "/data/refs"}


def _load(tmp_path, config: dict, backend: list | None = None):
    (tmp_path / "db.json").write_text(json.dumps(backend or [EDITS, REFS]))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": str(tmp_path / "db.json"), **config}))
    return load_config(tmp_path / "config.json")


@pytest.mark.parametrize(
    "value, area",
    [("1024x1024", 1024.0), ("768x768", 768.0), ("1280x768", int(math.sqrt(1280 * 768))), ("1024", 1024.0), (512, 512)],
)
def test_validation_resolution_as_the_quickstart_writes_it_is_the_preview_area(tmp_path, value, area):
    """SimpleTuner resizes an edit model's eval reference to the area W x H, keeping its aspect ratio: a
    pixel_area resolution of int(sqrt(W x H)). Nothing differs, so nothing is said."""
    config = _load(tmp_path, {"validation_resolution": value})
    assert config.train.validation_resolution == pytest.approx(area)
    assert not any("validation_resolution" in line for line in notes(config))


def test_several_validation_resolutions_preview_at_the_first_and_say_so(tmp_path):
    config = _load(tmp_path, {"validation_resolution": "768x768, 1024x1024"})
    assert config.train.validation_resolution == 768
    loud = [line for line in notes(config) if "validation_resolution" in line]
    assert len(loud) == 1 and loud[0].startswith("WARNING: differs from SimpleTuner") and "at the first" in loud[0]


def test_dataset_placeholders_are_filled_as_simpletuner_fills_them(tmp_path, monkeypatch):
    """{id}, {output_dir} and {model_family} in multidatabackend.json (SimpleTuner's
    `fill_variables_in_config_paths`); a placeholder it does not know stays as written."""
    monkeypatch.setenv("DATA", "/mnt/data")
    edits = dict(EDITS, cache_dir="{output_dir}/cache/{model_family}/{id}", instance_data_dir="{env:DATA}/{id}")
    refs = dict(REFS, instance_data_dir="/data/{id}/{unknown}")
    config = _load(tmp_path, {"output_dir": "/runs/one"}, [edits, refs])
    assert config.dataset("edits").cache_dir == "/runs/one/cache/qwen_image/edits"
    assert config.dataset("edits").instance_data_dir == "/mnt/data/edits"
    assert config.dataset("refs").instance_data_dir == "/data/refs/{unknown}"


def test_quantize_via_default_is_simpletuners(tmp_path):
    config = _load(tmp_path, {})
    assert config.train.quantize_via == "accelerator"  # SimpleTuner's registry default


@pytest.mark.parametrize(
    "keys, betas, eps, weight_decay",
    [
        ({}, (0.9, 0.999), 1e-6, 1e-2),  # SimpleTuner's default optimizer, adamw_bf16
        ({"optimizer": "optimi-adamw"}, (0.9, 0.99), 1e-6, 0.0),
        ({"optimizer": "bnb-adamw8bit"}, (0.9, 0.999), 1e-6, 1e-2),
        ({"optimizer": "adamw_bf16", "optimizer_config": "eps=1e-8,weight_decay=0.05"}, (0.9, 0.999), 1e-8, 0.05),
        ({"optimizer_beta1": 0.8, "optimizer_beta2": 0.95}, (0.8, 0.95), 1e-6, 1e-2),
    ],
)
def test_optimizer_settings_resolve_as_simpletuner_resolves_them(tmp_path, keys, betas, eps, weight_decay):
    """Each optimizer's own settings (SimpleTuner's optimizer_param.py), then optimizer_config, then both
    optimizer_beta1 and optimizer_beta2; nothing differs, so nothing is said."""
    config = _load(tmp_path, keys)
    train = config.train
    assert ((train.adam_beta1, train.adam_beta2), train.adam_epsilon, train.adam_weight_decay) == (
        betas,
        eps,
        weight_decay,
    )
    assert not [line for line in notes(config) if "optim" in line]


def test_optimizer_keys_simpletuner_would_not_apply_are_not_applied_and_said(tmp_path):
    config = _load(tmp_path, {"adam_beta2": 0.95, "adam_epsilon": 1e-10})
    train = config.train
    assert (train.adam_beta1, train.adam_beta2, train.adam_epsilon) == (0.9, 0.999, 1e-6)
    loud = [line for line in notes(config) if line.startswith("WARNING: differs from SimpleTuner")]
    assert any("adam_beta2" in line and "DeepSpeed" in line for line in loud)
    assert any("adam_epsilon" in line for line in loud)
    config = _load(tmp_path, {"optimizer_config": "eps=1e-7,kahan_sum=True"})
    assert config.train.adam_epsilon == 1e-7
    assert any("kahan_sum" in line for line in notes(config))


def test_dataset_keys_that_change_training_in_simpletuner_are_said_loudly(tmp_path):
    """is_regularisation_data (SimpleTuner: the base model's prediction is the target), a dataset's own
    train_batch_size, vae_cache_clear_each_epoch (re-crops each epoch): none is done here."""
    from shared.config_report import ignored_report

    edits = dict(EDITS, is_regularisation_data=True, train_batch_size=4)
    report = ignored_report(_load(tmp_path, {}, [edits, dict(REFS, vae_cache_clear_each_epoch=True)]))
    assert report[0].startswith("WARNING: 3 key(s) change what you train in SimpleTuner")
    assert {line.rsplit(": ", 1)[-1] for line in report[1:4]} == {
        "is_regularisation_data",
        "train_batch_size",
        "vae_cache_clear_each_epoch",
    }


def test_a_global_caption_strategy_is_the_datasets_fallback_as_in_simpletuner(tmp_path):
    config = _load(tmp_path, {"caption_strategy": "filename"}, [EDITS, REFS])
    assert config.dataset("edits").caption_strategy == "filename"
    config = _load(tmp_path, {"caption_strategy": "filename"}, [dict(EDITS, caption_strategy="textfile"), REFS])
    assert config.dataset("edits").caption_strategy == "textfile"
    assert _load(tmp_path, {}).dataset("edits").caption_strategy == "textfile"  # SimpleTuner: filename (said)
    from shared import simpletuner

    assert "caption_strategy" in {d.key for d in simpletuner.DIFFERENCES}


@pytest.mark.parametrize("schedule", ["cosine", "cosine_with_restarts"])
def test_cosine_schedules_say_how_simpletuners_differ(tmp_path, schedule):
    loud = [line for line in notes(_load(tmp_path, {"lr_scheduler": schedule})) if line.startswith("WARNING")]
    assert len(loud) == 1 and f"lr_scheduler {schedule}: SimpleTuner" in loud[0]
    assert not [line for line in notes(_load(tmp_path, {"lr_scheduler": "polynomial"})) if "lr_scheduler" in line]


def test_config_env_values_are_expanded_as_the_shell_that_sources_it_would(tmp_path, monkeypatch):
    """SimpleTuner's users `source config.env`: ${VAR}, ${VAR:-default}, $VAR, earlier lines, no command run."""
    from shared.config_report import ignored_report
    from shared.errors import UserError

    monkeypatch.setenv("HOME", "/home/me")
    monkeypatch.delenv("STEPS", raising=False)
    (tmp_path / "db.json").write_text(json.dumps([EDITS, REFS]))
    env = (
        f"export DATALOADER_CONFIG='{tmp_path / 'db.json'}'\n"
        'export OUTPUT_DIR="${HOME}/out"\n'
        'export MAX_NUM_STEPS="${STEPS:-7}"\n'
        "RATE=2e-4\n"
        'export LEARNING_RATE="$RATE"\n'
        "export VALIDATION_NEGATIVE_PROMPT='${HOME} stays'\n"
        "export USE_DORA=true\nexport LR_END=1e-6\nexport LYCORIS_CONFIG=config/lycoris.json\n"
    )
    (tmp_path / "config.env").write_text(env)
    config = load_config(tmp_path / "config.env")
    train = config.train
    assert (train.output_dir, train.max_train_steps, train.learning_rate) == ("/home/me/out", 7, 2e-4)
    assert train.validation_negative_prompt == "${HOME} stays"  # single quotes: literal, as in a shell
    assert train.lr_end == 1e-6
    loud = ignored_report(config)
    assert loud[0].startswith("WARNING: 2 key(s) change what you train")
    assert {line.rsplit(": ", 1)[-1] for line in loud[1:3]} == {"use_dora", "lycoris_config"}
    (tmp_path / "config.env").write_text(env + 'export OUTPUT_DIR="$(pwd)/out"\n')
    with pytest.raises(UserError, match="OUTPUT_DIR: the value runs a command"):
        load_config(tmp_path / "config.env")


def test_area_resolutions_in_megapixels_as_simpletuners_dataloader_writes_them(tmp_path):
    """resolution_type "area": resolution and minimum_image_size in megapixels (0.5, 0.065)."""
    edits = dict(EDITS, resolution_type="area", resolution=0.5, minimum_image_size="0.065")
    config = _load(tmp_path, {}, [edits, REFS])
    assert (config.dataset("edits").resolution, config.dataset("edits").minimum_image_size) == (0.5, 0.065)
    assert config.dataset("refs").resolution == 1024 and isinstance(config.dataset("refs").resolution, int)


@pytest.mark.parametrize("weights", ["edit-v1", "edit-v2", "edit-v3"])
def test_an_omitted_model_flavour_follows_the_weights_and_a_contradicting_one_is_said(tmp_path, tiny_models, weights):
    config = _load(tmp_path, {"pretrained_model_name_or_path": str(tiny_models[weights])})
    assert config.train.model_flavour == weights
    other = "edit-v1" if weights != "edit-v1" else "edit-v2"
    keys = {"pretrained_model_name_or_path": str(tiny_models[weights]), "model_flavour": other}
    config = _load(tmp_path, keys, [EDITS, REFS])
    assert config.train.model_flavour == other
    assert any(line.startswith(f"WARNING: differs from SimpleTuner: model_flavour {other}") for line in notes(config))


def test_2511_weights_trained_as_edit_v2_are_said_and_2509_as_edit_v2_plus_is_not(tmp_path, tiny_models):
    """edit-v2 on 2511's weights would train without the zero_cond_t its inference uses; edit-v2+ is 2509's weights
    with that flag on, chosen on purpose."""
    keys = {"pretrained_model_name_or_path": str(tiny_models["edit-v3"]), "model_flavour": "edit-v2"}
    (line,) = [line for line in notes(_load(tmp_path, keys, [EDITS, REFS])) if "model_flavour" in line]
    assert "zero_cond_t" in line and "remove model_flavour" in line
    keys = {"pretrained_model_name_or_path": str(tiny_models["edit-v2"]), "model_flavour": "edit-v2+"}
    assert not [line for line in notes(_load(tmp_path, keys, [EDITS, REFS])) if "model_flavour" in line]


def test_forms_simpletuner_refuses_are_refused_here_naming_the_key(tmp_path):
    from shared.errors import UserError

    with pytest.raises(UserError, match="'resolution' is 0.5, a fraction, but resolution_type is 'pixel_area'"):
        _load(tmp_path, {}, [dict(EDITS, resolution=0.5), REFS])
    for value in ("1.0", "0.5", [], "1024x"):
        with pytest.raises(UserError, match="validation_resolution"):
            _load(tmp_path, {"validation_resolution": value})
    with pytest.raises(UserError, match="set both optimizer_beta1 and optimizer_beta2"):
        _load(tmp_path, {"optimizer_beta1": 0.9})


def test_nested_shell_defaults_in_config_env():
    from shared.config_env import parse_env_file

    variables = parse_env_file("A=1\nD=${Z:-${A}}\nE=\"$A-x ${A}\"\nF=${UNSET_X-d}\nG='$A'")
    assert (variables["D"], variables["E"], variables["F"], variables["G"]) == ("1", "1-x 1", "d", "$A")
