import json

import pytest

from shared.config import load_config
from shared.config_report import ignored_report, notes
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
    assert ignored_report(config) == [  # SimpleTuner re-encodes each epoch with vae_cache_clear_each_epoch
        "WARNING: 1 key(s) change what you train in SimpleTuner; we do not support them yet:",
        f"  {tmp_path / 'db.json'}: dataset 'refs': vae_cache_clear_each_epoch",
        f"ignored 2 key(s) that do not change training: {path}: push_to_hub, {path}: validation_prompt",
    ]


def test_unused_keys_that_change_training_are_reported_loudly(tmp_path):
    path = _write(tmp_path, {"snr_gamma": 5, "noise_offset": 0.1, "push_to_hub": True}, BACKEND)
    report = ignored_report(load_config(path))
    assert report[0] == "WARNING: 3 key(s) change what you train in SimpleTuner; we do not support them yet:"
    assert report[1].endswith(": snr_gamma") and report[2].endswith(": noise_offset")
    assert report[3].endswith(": vae_cache_clear_each_epoch")  # in db.json
    assert report[4].startswith("ignored 1 key(s) that do not change training:")  # push_to_hub


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optimizer", "prodigy", "use adamw .or adamw_bf16, which means it here. or bnb-adamw8bit"),
        ("lr_scheduler", "sine", "use cosine"),
        ("lora_type", "lycoris", "LyCORIS adapters are not supported yet"),
        ("base_model_precision", "int8-torchao", "use no_change, int8-quanto, .* or nf4-bnb"),
        ("report_to", "comet_ml", "use one of 'none', 'tensorboard', 'wandb', 'all'"),
    ],
)
def test_simpletuner_values_we_do_not_support_name_what_to_write(tmp_path, key, value, message):
    path = _write(tmp_path, {key: value}, BACKEND)
    with pytest.raises(UserError, match=f"key '{key}' is '{value}'; .*{message}"):
        load_config(path)


def test_simpletuner_values_with_the_same_meaning_work(tmp_path):
    path = _write(
        tmp_path,
        {"optimizer": "adamw_bf16", "lr_scheduler": "cosine_with_restarts", "base_model_precision": "fp8uz-quanto"},
        BACKEND,
    )
    cfg = load_config(path).train
    assert (cfg.optimizer, cfg.lr_scheduler, cfg.base_model_precision) == (
        "adamw",
        "cosine_with_restarts",
        "fp8uz-quanto",
    )


def test_bad_value_names_file_dataset_and_key(tmp_path):
    backend = [dict(BACKEND[0], resolution="big"), BACKEND[1]]
    path = _write(tmp_path, {"model_flavour": "edit-v1"}, backend)
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert "db.json" in message and "dataset 'edits'" in message and "'resolution'" in message


def test_bad_choice_lists_the_allowed_values(tmp_path):
    path = _write(tmp_path, {"model_flavour": "edit-v9"}, BACKEND)
    with pytest.raises(UserError, match=r"config.json: key 'model_flavour' is 'edit-v9'; use one of 'edit-v1'"):
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
    assert config.cache_location_for(config.main_datasets()[0]) == "cache/vae/edits"


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
        ("seed", 2**70, r"\[0, 2\*\*63"),  # torch's generators take 64 bits: it used to crash training
        ("seed", -1, r"\[0, 2\*\*63"),
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
    to `seed`; a validation_resolution that is no resolution is refused with what to write instead."""
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
    path.write_text(json.dumps(dict(base, validation_resolution="large")))
    with pytest.raises(UserError, match="validation_resolution.*WIDTHxHEIGHT such as 1024x1024"):
        load_config(path)


def test_simpletuner_entries_and_defaults_mean_what_they_mean_there(tmp_path):
    """A config and dataloader written as SimpleTuner's Qwen edit and DATALOADER guides write them."""
    backend = [
        {  # crop: true alone is SimpleTuner's default style and aspect: random, square
            "id": "edits",
            "type": "local",
            "instance_data_dir": "data/edited",
            "caption_strategy": "textfile",
            "crop": True,
            "conditioning_data": ["refs"],
            "cache_dir_vae": "cache/vae/edits",
        },
        {  # a reference entry with conditioning_type and no dataset_type, captions null
            "id": "refs",
            "type": "local",
            "instance_data_dir": "data/reference",
            "conditioning_type": "reference_strict",
            "caption_strategy": None,
        },
        {"id": "held-out", "dataset_type": "eval", "instance_data_dir": "data/eval", "conditioning_data": ["refs"]},
        {"id": "old", "instance_data_dir": "data/old", "disable": True},  # SimpleTuner's older spelling
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local", "cache_dir": "c/t"},
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    config = {
        "--data_backend_config": str(tmp_path / "multidatabackend.json"),
        "--lora_rank": 32,  # no lora_alpha: it is the rank, as in SimpleTuner
        "--checkpoint_step_interval": 250,  # the current name of checkpointing_steps
        "--resolution": 768,  # datasets without their own resolution use it
        "--resolution_type": "pixel_area",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_config(tmp_path / "config.json")
    cfg, edits, refs = loaded.train, loaded.dataset("edits"), loaded.dataset("refs")
    assert (cfg.lora_alpha, cfg.checkpointing_steps) == (32.0, 250)
    assert (edits.crop, edits.crop_style, edits.crop_aspect, edits.resolution) == (True, "random", "square", 768)
    assert refs.dataset_type == "conditioning" and refs.caption_strategy == "textfile"
    assert cfg.eval_dataset_id == "held-out" and loaded.dataset("held-out").dataset_type == "image"
    assert [m.id for m in loaded.main_datasets()] == ["edits", "held-out"]  # "old" is disabled
    (note,) = notes(loaded)
    assert "'text-embeds' (text_embeds) is not needed here" in note
    assert not loaded.ignored or all("default" in line or "type" in line for line in loaded.ignored)


def test_config_files_as_simpletuner_reads_them(tmp_path, monkeypatch):
    """config.json with the guides' // comments, config.toml, SimpleTuner's config.env, and {env:...} and
    {model_family} placeholders."""
    monkeypatch.setenv("EDITS_ROOT", "/data/edits")
    backend = [dict(BACKEND[0], instance_data_dir="{env:EDITS_ROOT}/images", cache_dir="cache/{model_family}/edits")]
    (tmp_path / "db.json").write_text("// datasets\n" + json.dumps(backend + BACKEND[1:]))
    text = (
        "{\n  // the Qwen edit quickstart's comments\n"
        f'  "data_backend_config": "{tmp_path / "db.json"}", /* inline */\n'
        '  "learning_rate": "1e-4", "instance_prompt": "a // not a comment"\n}\n'
    )
    (tmp_path / "config.json").write_text(text)
    loaded = load_config(tmp_path / "config.json")
    edits = loaded.dataset("edits")
    assert (edits.instance_data_dir, edits.cache_dir) == ("/data/edits/images", "cache/qwen_image/edits")
    assert loaded.train.learning_rate == pytest.approx(1e-4)

    toml = f'data_backend_config = "{tmp_path / "db.json"}"\nlearning_rate = 2e-4\n"--lora_rank" = 8\n'
    (tmp_path / "config.toml").write_text(toml)
    cfg = load_config(tmp_path / "config.toml").train
    assert (cfg.learning_rate, cfg.lora_rank, cfg.lora_alpha) == (2e-4, 8, 8.0)

    env = (
        "# SimpleTuner's config.env\n"
        f"export DATALOADER_CONFIG='{tmp_path / 'db.json'}'\n"
        'export LEARNING_RATE="3e-4"\nexport USE_EMA=true\nexport USE_GRADIENT_CHECKPOINTING=false\n'
        "export TRAINING_NUM_PROCESSES=1\n"
        'export TRAINER_EXTRA_ARGS="--lora_rank=4 --validation_steps 50"\n'
        'export TRAINER_EXTRA_ARGS+="--use_ema"\n'
    )
    (tmp_path / "config.env").write_text(env)
    loaded = load_config(tmp_path / "config.env")
    cfg = loaded.train
    assert (cfg.learning_rate, cfg.use_ema, cfg.gradient_checkpointing) == (3e-4, True, False)
    assert (cfg.lora_rank, cfg.validation_step_interval) == (4, 50)
    assert any("TRAINING_NUM_PROCESSES (config.env variable)" in line for line in loaded.ignored)
    monkeypatch.delenv("EDITS_ROOT")
    with pytest.raises(UserError, match=r"uses \{env:EDITS_ROOT\}, but EDITS_ROOT is not set"):
        load_config(tmp_path / "config.json")


def test_print_config_says_where_each_setting_came_from(tmp_path):
    from typer.testing import CliRunner

    from train.cli import app

    path = _write(tmp_path, {"learning_rate": 2e-4}, BACKEND)
    result = CliRunner().invoke(app, ["run", "--config", str(path), "--print-config", "--max-train-steps", "9"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "  learning_rate = 0.0002  [config.json]" in lines
    assert "  max_train_steps = 9  [command line]" in lines
    assert "  lora_dropout = 0.0  [default; SimpleTuner's is 0.1]" in lines
    assert "  lora_rank = 16  [default, as SimpleTuner's]" in lines
    assert "  train_batch_size = 1  [default; SimpleTuner's is 4]" in lines
    assert "  resolution = 512  [db.json]" in lines


def test_prep_validate_and_train_run_say_which_defaults_differ_from_simpletuner(tmp_path):
    from typer.testing import CliRunner

    from prep.cli import app

    path = _write(tmp_path, {}, BACKEND)
    result = CliRunner().invoke(app, ["validate", "--config", str(path)])
    lines = result.output.splitlines()
    assert lines[0] == "defaults that differ from SimpleTuner's (set the key to choose):"
    assert any(line.startswith("  learning_rate: SimpleTuner 4e-7") for line in lines)
    assert any(line.startswith("  validation_guidance: SimpleTuner 7.5, here 4.0") for line in lines)


# SimpleTuner's defaults for the keys we share, as its option registry (field_registry/sections/*.py) and
# DATALOADER.md give them.
SIMPLETUNER_DEFAULTS = {
    "model_type": "lora",
    "num_train_epochs": 1,
    "max_train_steps": 0,
    "gradient_accumulation_steps": 1,
    "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 0,
    "lora_rank": 16,
    "lora_alpha": 16.0,  # unset: the rank
    "lora_type": "standard",
    "checkpointing_steps": 500,
    "checkpoints_total_limit": 5,
    "max_grad_norm": 2.0,
    "flow_schedule_shift": 3.0,
    "caption_dropout_probability": 0.1,
    "use_ema": False,
    "ema_device": "cpu",
    "ema_decay": 0.995,
    "mixed_precision": "bf16",
    "lr_end": 4e-7,
    "lora_target": "attention_image",  # to_q, to_k, to_v, to_out.0 of the image stream
    "lr_power": 0.8,
    "quantize_via": "accelerator",
    "report_to": "none",
    "tracker_project_name": "simpletuner",
    "tracker_run_name": "simpletuner-testing",
    "validation_step_interval": 100,
    "validation_num_inference_steps": 30,
    # dataset entries
    "resolution": 1024,
    "resolution_type": "pixel_area",
    "crop": False,
    "crop_style": "random",  # applies only with crop: true
    "crop_aspect": "square",
    "repeats": 0,
    # scheduled sampling (its field registry, sections/advanced.py); ReflexFlow's None means on for flow models
    "scheduled_sampling_max_step_offset": 0,
    "scheduled_sampling_probability": 0.0,
    "scheduled_sampling_prob_start": 0.0,
    "scheduled_sampling_prob_end": 0.5,
    "scheduled_sampling_ramp_steps": 0,
    "scheduled_sampling_start_step": 0,
    "scheduled_sampling_ramp_shape": "linear",
    "scheduled_sampling_strategy": "uniform",
    "scheduled_sampling_sampler": "unipc",
    "scheduled_sampling_order": 2,
    "scheduled_sampling_reflexflow": True,
    "scheduled_sampling_reflexflow_alpha": 1.0,
    "scheduled_sampling_reflexflow_beta1": 10.0,
    "scheduled_sampling_reflexflow_beta2": 1.0,
}


def test_omitted_keys_take_simpletuners_defaults(tmp_path):
    """Every key we list as sharing SimpleTuner's default resolves to that default when a config omits it, and
    every default that differs is printed at the start of a run instead."""
    from shared import simpletuner

    assert simpletuner.SAME_DEFAULTS <= SIMPLETUNER_DEFAULTS.keys()
    loaded = load_config(_write(tmp_path, {}, BACKEND))
    main = loaded.main_datasets()[0]
    for key in simpletuner.SAME_DEFAULTS:
        value = getattr(loaded.train, key) if hasattr(loaded.train, key) else getattr(main, key)
        assert value == SIMPLETUNER_DEFAULTS[key], key
    differing = {d.key for d in simpletuner.DIFFERENCES}
    assert {"conditioning_multidataset_sampling", "seed", "learning_rate", "train_batch_size"} <= differing
    assert not differing & simpletuner.SAME_DEFAULTS


def test_captions_set_on_a_reference_dataset_are_named_as_unused(tmp_path):
    """SimpleTuner refuses captions on reference datasets (combined mode); here they are read past with a note."""
    backend = [
        {"id": "edits", "instance_data_dir": "data/edited", "conditioning_data": ["refs"]},
        {
            "id": "refs",
            "instance_data_dir": "data/ref",
            "conditioning_type": "reference_strict",
            "caption_strategy": "textfile",
        },
    ]
    (note,) = notes(load_config(_write(tmp_path, {}, backend)))
    assert note.startswith("note: dataset 'refs' sets caption_strategy, which a reference dataset does not use")


def test_a_key_given_twice_or_under_two_spellings_with_different_values_is_refused_naming_both(tmp_path):
    path = _write(tmp_path, {}, BACKEND)
    text = path.read_text()
    path.write_text(text[:-1] + ', "lora_rank": 8, "lora_rank": 32}')
    with pytest.raises(UserError, match=r"key 'lora_rank' is given twice in one object \(8 and 32\)"):
        load_config(path)

    path = _write(tmp_path, {"lora_rank": 8, "--lora_rank": 32}, BACKEND)
    with pytest.raises(UserError, match=r"'lora_rank' \(8\) and '--lora_rank' \(32\) set the same key"):
        load_config(path)
    path = _write(tmp_path, {"checkpointing_steps": 500, "checkpoint_step_interval": 100}, BACKEND)
    with pytest.raises(UserError, match=r"'checkpointing_steps' \(500\) and 'checkpoint_step_interval' \(100\)"):
        load_config(path)
    same = load_config(_write(tmp_path, {"lora_rank": 8, "--lora_rank": 8, "checkpoint_step_interval": 100}, BACKEND))
    assert same.train.lora_rank == 8 and same.train.checkpointing_steps == 100  # one value, however spelled


def test_a_dataset_key_under_two_spellings_with_different_values_is_refused(tmp_path):
    entry = dict(BACKEND[0], **{"--resolution": 768})
    with pytest.raises(UserError, match=r"dataset 'edits': 'resolution' \(512\) and '--resolution' \(768\)"):
        load_config(_write(tmp_path, {}, [entry, *BACKEND[1:]]))
