import json

import pytest

from shared.config import load_config
from shared.errors import UserError


def _write(tmp_path, config: dict, backend: list) -> str:
    (tmp_path / "db.json").write_text(json.dumps(backend))
    config = {"data_backend_config": str(tmp_path / "db.json"), **config}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path / "config.json"


BACKEND = [
    {"id": "edits", "instance_data_dir": "/data/images", "conditioning_data": ["refs"], "resolution": 512},
    {
        "id": "refs",
        "dataset_type": "conditioning",
        "instance_data_dir": "/data/refs",
        "vae_cache_clear_each_epoch": True,
    },
]


def test_simpletuner_config_loads_with_unknown_keys_listed(tmp_path):
    path = _write(
        tmp_path,
        {"--model_flavour": "edit-v1", "learning_rate": "1e-4", "push_to_hub": True, "validation_prompt": "x"},
        BACKEND,
    )
    config = load_config(path)
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.train.pretrained_model_name_or_path == "Qwen/Qwen-Image-Edit"
    assert [d.id for d in config.main_datasets()] == ["edits"]
    assert config.dataset("edits").resolution == 512
    assert any(line.endswith(": push_to_hub") for line in config.ignored)
    assert any("dataset 'refs': vae_cache_clear_each_epoch" in line for line in config.ignored)
    assert "ignored 3 config key(s)" in config.ignored_report()[0]


def test_bad_value_names_file_dataset_and_key(tmp_path):
    backend = [dict(BACKEND[0], resolution="big"), BACKEND[1]]
    path = _write(tmp_path, {"model_flavour": "edit-v1"}, backend)
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert "db.json" in message and "dataset 'edits'" in message and "'resolution'" in message


def test_bad_choice_lists_the_allowed_values(tmp_path):
    path = _write(tmp_path, {"model_flavour": "edit-v3"}, BACKEND)
    with pytest.raises(UserError, match=r"config.json: key 'model_flavour' is 'edit-v3'; use one of 'edit-v1'"):
        load_config(path)


def test_reference_count_is_checked_per_flavour(tmp_path):
    backend = [
        dict(BACKEND[0], conditioning_data=["r1", "r2"]),
        {"id": "r1", "dataset_type": "conditioning", "instance_data_dir": "/a"},
        {"id": "r2", "dataset_type": "conditioning", "instance_data_dir": "/b"},
    ]
    with pytest.raises(UserError, match="edit-v1 takes 1 to 1"):
        load_config(_write(tmp_path, {"model_flavour": "edit-v1"}, backend))
    config = load_config(_write(tmp_path, {"model_flavour": "edit-v2"}, backend))
    assert [d.id for d in config.conditioning_for(config.main_datasets()[0])] == ["r1", "r2"]


def test_unknown_conditioning_dataset_is_an_error(tmp_path):
    backend = [dict(BACKEND[0], conditioning_data=["nope"])]
    with pytest.raises(UserError, match="names 'nope', which is not a dataset id"):
        load_config(_write(tmp_path, {}, backend))


def test_cache_dir_follows_design_order(tmp_path):
    backend = [dict(BACKEND[0], cache_dir_vae="cache/vae/edits"), BACKEND[1]]
    config = load_config(_write(tmp_path, {}, backend))
    assert str(config.cache_dir_for(config.main_datasets()[0])) == "cache/vae/edits"


def test_memory_keys_are_read_and_the_ones_you_set_are_remembered(tmp_path):
    path = _write(tmp_path, {"--memory_mode": "low", "blocks_to_swap": "12", "gradient_checkpointing": "true"}, BACKEND)
    config = load_config(path)
    assert config.train.memory_mode == "low" and config.train.blocks_to_swap == 12
    assert {"memory_mode", "blocks_to_swap", "gradient_checkpointing", "data_backend_config"} == config.explicit
    bad = _write(tmp_path, {"memory_mode": "tiny"}, BACKEND)
    with pytest.raises(UserError, match=r"key 'memory_mode' is 'tiny'; use one of 'auto', 'fast'"):
        load_config(bad)
    with pytest.raises(UserError, match="'gradient_checkpointing_interval' is 0; it must be >= 1"):
        load_config(_write(tmp_path, {"gradient_checkpointing_interval": 0}, BACKEND))


def test_two_main_datasets_pointed_at_one_cache_dir_are_refused_naming_both(tmp_path):
    second = [
        {"id": "more", "instance_data_dir": "/data/more", "conditioning_data": ["refs"], "cache_dir_vae": "cache/edits"}
    ]
    with pytest.raises(UserError, match=r"datasets 'edits' and 'more' both use the cache dir cache/edits"):
        load_config(_write(tmp_path, {}, BACKEND + second))


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("max_train_steps", -5, ">= 0"),
        ("num_train_epochs", 0, ">= 1"),
        ("lora_rank", 0, ">= 1"),
        ("learning_rate", 0, "> 0"),
        ("learning_rate", float("nan"), "finite"),
        ("lora_dropout", 1.0, r"in \[0, 1\)"),
        ("dataloader_num_workers", -1, ">= 0"),
        ("checkpoints_total_limit", -2, ">= 0"),
    ],
)
def test_a_value_that_makes_no_sense_is_refused_with_the_key_and_the_allowed_range(tmp_path, key, value, allowed):
    with pytest.raises(UserError, match=rf"key '{key}' is .*; it must be .*{allowed}"):
        load_config(_write(tmp_path, {key: value}, BACKEND))


def test_half_a_checkpointing_step_is_an_error_not_checkpoints_off(tmp_path):
    with pytest.raises(UserError, match=r"key 'checkpointing_steps' is 0.5; expected whole number"):
        load_config(_write(tmp_path, {"checkpointing_steps": 0.5}, BACKEND))
    assert load_config(_write(tmp_path, {"checkpointing_steps": 250.0}, BACKEND)).train.checkpointing_steps == 250


def test_a_config_saved_as_utf16_by_a_windows_editor_is_read_and_other_encodings_are_named(tmp_path):
    path = _write(tmp_path, {"learning_rate": 3e-4}, BACKEND)
    path.write_bytes(path.read_text().encode("utf-16"))  # with its BOM
    assert load_config(path).train.learning_rate == 3e-4
    path.write_bytes('{"learning_rate": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text .*save it as UTF-8"):
        load_config(path)


def test_validation_keys_as_simpletuner_writes_them(tmp_path):
    """`validation_steps` is SimpleTuner's older name of `validation_step_interval`; `validation_seed` defaults
    to `seed`; a "WxH" validation_resolution is refused with what to write instead."""
    backend = tmp_path / "backend.json"
    entries = [
        {"id": "d", "instance_data_dir": "x", "conditioning_data": ["r"]},
        {"id": "r", "instance_data_dir": "y", "dataset_type": "conditioning"},
    ]
    backend.write_text(json.dumps(entries))
    base = {"data_backend_config": str(backend), "seed": 5}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(base, **{"--validation_steps": "250", "validation_guidance": "3.5"})))
    cfg = load_config(path).train
    assert (cfg.validation_step_interval, cfg.validation_guidance, cfg.validation_seed) == (250, 3.5, 5)
    path.write_text(json.dumps(dict(base, validation_resolution="1024x768")))
    with pytest.raises(UserError, match="validation_resolution.*give one number"):
        load_config(path)
