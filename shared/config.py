"""Load a SimpleTuner-style `config.json` + `multidatabackend.json` into typed objects.

Keys we do not use are collected in `Config.ignored` (reported once by the CLI), never an
error: users bring configs from SimpleTuner unchanged. A key we use with a bad value is a
`UserError` naming the file, the dataset id (for dataset entries) and the key.

Keys may be written with or without SimpleTuner's leading `--`. Relative paths are taken
relative to the directory the command runs in, as SimpleTuner does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shared import simpletuner
from shared.config_checks import check_datasets, check_ranges, validation_resolution_area
from shared.config_declare import aliases_of, check_declared_ranges
from shared.config_files import expand_placeholders, read_config_file
from shared.config_keys import BASE_MODEL_PRECISIONS, LORA_TARGETS, DatasetConfig, TrainConfig
from shared.config_values import SIZE_KEYS, fill_fields
from shared.errors import UserError
from shared.flavours import FLAVOURS, flavour_of_weights

__all__ = ["BASE_MODEL_PRECISIONS", "LORA_TARGETS", "Config", "DatasetConfig", "TrainConfig", "load_config"]


@dataclass
class Config:
    """Everything one `config.json` describes, with the datasets it points to."""

    train: TrainConfig
    datasets: list[DatasetConfig]
    config_path: Path
    backend_path: Path
    ignored: list[str]  # "file: key" for every key we read past
    explicit: set[str] = field(default_factory=set)  # config.json keys the user set (or overrode)
    overridden: set[str] = field(default_factory=set)  # keys set on the command line
    dataset_keys: dict[str, set[str]] = field(default_factory=dict)  # dataset id -> keys its entry sets
    differences: list[str] = field(default_factory=list)  # "key: SimpleTuner ..., here ..." for values set

    def dataset(self, dataset_id: str) -> DatasetConfig:
        return next(d for d in self.datasets if d.id == dataset_id)

    def main_datasets(self) -> list[DatasetConfig]:
        return [d for d in self.datasets if d.dataset_type == "image" and not d.disabled]

    def conditioning_for(self, main: DatasetConfig) -> list[DatasetConfig]:
        """The reference datasets of a main dataset, in the order its `conditioning_data` lists them."""
        return [self.dataset(i) for i in main.conditioning_data]

    def cache_location_for(self, main: DatasetConfig) -> str:
        """The main entry's `cache_dir`, else its `cache_dir_vae`, else `cache/<id>` (DESIGN.md): a path or URL."""
        return main.cache_dir or main.cache_dir_vae or f"cache/{main.id}"


# Dataset types that name where SimpleTuner caches embeddings: our one cache per main dataset holds them.
CACHE_ONLY_TYPES = ("text_embeds", "image_embeds", "conditioning_image_embeds")


def one_spelling_per_key(raw: dict[str, Any], where: str | Path, aliases: dict[str, str]) -> dict[str, Any]:
    """Keys by the names used here: SimpleTuner's `--name` (command-line form) and older names (`aliases`)
    read as `name`. One key given under two spellings with different values is refused, naming both."""
    spelled: dict[str, tuple[str, Any]] = {}  # name used here -> (the spelling the file used, its value)
    for key, value in raw.items():
        name = key.removeprefix("--")
        name = aliases.get(name, name)
        if name in spelled and spelled[name][1] != value:
            first, before = spelled[name]
            raise UserError(
                f"{where}: '{first}' ({json.dumps(before, default=str)}) and '{key}' "
                f"({json.dumps(value, default=str)}) set the same key to different values; keep one"
            )
        spelled.setdefault(name, (key, value))
    return {name: value for name, (_, value) in spelled.items()}


def load_config(config_path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read `config.json` and the `multidatabackend.json` it names.

    `overrides` (from CLI flags) replace config keys of the same name for one run.
    """
    config_path = Path(config_path)
    raw = one_spelling_per_key(read_config_file(config_path, expect=dict), config_path, aliases_of(TrainConfig))
    raw.update(overrides or {})
    family = str(raw.get("model_family", TrainConfig.model_family))
    raw = expand_placeholders(raw, {"model_family": family}, str(config_path))
    differences: list[str] = []  # where a value means more in SimpleTuner than we do with it
    if "validation_resolution" in raw:
        raw["validation_resolution"], note = validation_resolution_area(raw["validation_resolution"], config_path)
        differences += [note] if note else []
    optimizer = str(raw.get("optimizer", raw.get("--optimizer")) or simpletuner.DEFAULT_OPTIMIZER)
    for key in simpletuner.DEEPSPEED_ONLY_KEYS & {k.removeprefix("--") for k in raw}:
        raw.pop(key, None), raw.pop(f"--{key}", None)
        differences.append(simpletuner.deepspeed_only_note(key))
    ignored: list[str] = []
    train = fill_fields(TrainConfig(), raw, str(config_path), ignored)
    differences += simpletuner.schedule_notes(train.lr_scheduler)
    settings, notes = simpletuner.optimizer_settings(
        optimizer, train.optimizer_beta1, train.optimizer_beta2, train.optimizer_config, str(config_path)
    )
    (train.adam_beta1, train.adam_beta2), train.adam_epsilon, train.adam_weight_decay = settings
    differences += notes
    if not train.lora_alpha:
        train.lora_alpha = float(train.lora_rank)
    if train.validation_seed == -1:
        train.validation_seed = train.seed
    if train.lr_scheduler == "constant" and train.lr_warmup_steps:
        train.lr_scheduler = "constant_with_warmup"
    if not train.data_backend_config:
        raise UserError(f"{config_path}: key 'data_backend_config' is missing; set it to your multidatabackend.json")
    weights = flavour_of_weights(train.pretrained_model_name_or_path) if train.pretrained_model_name_or_path else None
    if weights and "model_flavour" not in raw and "--model_flavour" not in raw:
        train.model_flavour = weights  # the weights say which they are
    elif weights and FLAVOURS[weights].plus != FLAVOURS[train.model_flavour].plus:
        differences.append(
            f"model_flavour {train.model_flavour}: the weights at {train.pretrained_model_name_or_path} are "
            f"{FLAVOURS[weights].pipeline_class}'s ({weights}); training would encode and sample as the other "
            "pipeline does (remove model_flavour to follow the weights)"
        )
    elif weights and FLAVOURS[weights].zero_cond_t and not FLAVOURS[train.model_flavour].zero_cond_t:
        differences.append(
            f"model_flavour {train.model_flavour}: the weights at {train.pretrained_model_name_or_path} are 2511's "
            f"({weights}: their transformer modulates the references with timestep 0, zero_cond_t); this flavour "
            "trains without it, unlike inference with these weights (remove model_flavour to follow the weights)"
        )
    if not train.pretrained_model_name_or_path:
        train.pretrained_model_name_or_path = FLAVOURS[train.model_flavour].default_model
    check_ranges(train, config_path)

    backend_path = Path(train.data_backend_config)
    entries = read_config_file(backend_path, expect=list)
    datasets, dataset_keys = [], {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("id"):
            raise UserError(f"{backend_path}: entry {index} has no 'id'; every dataset needs a unique id")
        where = f"{backend_path}: dataset '{entry['id']}'"
        entry = one_spelling_per_key(entry, where, aliases_of(DatasetConfig))
        variables = {"model_family": train.model_family, "output_dir": train.output_dir, "id": str(entry["id"])}
        entry = expand_placeholders(entry, variables, where)
        if "dataset_type" not in entry and "conditioning_type" in entry:
            entry["dataset_type"] = "conditioning"  # as SimpleTuner's guides write reference datasets
        # Unset dataset settings fall back to the config's global ones, as in SimpleTuner.
        defaults = DatasetConfig(
            id=str(entry["id"]),
            resolution=train.resolution,
            resolution_type=train.resolution_type,
            minimum_image_size=train.minimum_image_size,
            caption_strategy=train.caption_strategy or "textfile",
        )
        dataset = fill_fields(defaults, entry, where, ignored)
        check_declared_ranges(dataset, where)
        for key in SIZE_KEYS:  # a fraction means megapixels, which only resolution_type "area" counts in
            if dataset.resolution_type != "area" and not float(getattr(dataset, key)).is_integer():
                raise UserError(
                    f"{where}: key '{key}' is {getattr(dataset, key)!r}, a fraction, but resolution_type is "
                    f"'{dataset.resolution_type}' (pixels); whole pixels, or resolution_type 'area' for megapixels"
                )
        if isinstance(dataset.conditioning_data, str):
            dataset.conditioning_data = [dataset.conditioning_data]
        datasets.append(dataset)
        dataset_keys[dataset.id] = {k for k, v in entry.items() if v is not None}
    _adopt_eval_dataset(train, datasets, backend_path)
    explicit = {k for k, v in raw.items() if k in {f.name for f in fields(TrainConfig)} and v is not None}
    config = Config(
        train, datasets, config_path, backend_path, ignored, explicit, set(overrides or {}), dataset_keys, differences
    )
    check_datasets(config)
    return config


def _adopt_eval_dataset(train: TrainConfig, datasets: list[DatasetConfig], backend_path: Path) -> None:
    """SimpleTuner's `dataset_type: "eval"` entry is a main dataset held out for evaluation: eval_dataset_id."""
    evals = [d for d in datasets if d.dataset_type == "eval" and not d.disabled]
    if len(evals) > 1:
        raise UserError(
            f"{backend_path}: datasets {', '.join(d.id for d in evals)} all have dataset_type 'eval'; one eval "
            "dataset is supported: merge them into one folder, or disable all but one"
        )
    for dataset in evals:
        if train.eval_dataset_id and train.eval_dataset_id != dataset.id:
            raise UserError(
                f"{backend_path}: dataset '{dataset.id}' has dataset_type 'eval' but eval_dataset_id is "
                f"'{train.eval_dataset_id}'; keep one of the two"
            )
        dataset.dataset_type, train.eval_dataset_id = "image", dataset.id
