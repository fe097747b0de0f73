"""The checks a loaded config must pass before anything runs: value ranges, dataset wiring, and the
SimpleTuner forms we refuse. Each failure is a `UserError` naming the file, the dataset and the key."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config_declare import check_declared_ranges
from shared.errors import UserError
from shared.flavours import FLAVOURS

if TYPE_CHECKING:
    from shared.config import Config, TrainConfig


def validation_resolution_area(value: Any, config_path: Path) -> tuple[Any, str | None]:
    """SimpleTuner's `validation_resolution` ("1024", "1024x1024", "1280x768", or several, comma-separated)
    as the pixel_area resolution previews use, and a note when SimpleTuner would do more than we do.

    For edit models SimpleTuner resizes each eval sample's reference to the area W x H, keeping the
    reference's aspect ratio (`validation.py`, `calculate_new_size_by_pixel_area`): a pixel_area
    resolution of int(sqrt(W x H)), the edge of the square of that area, as it computes it. With
    several it renders every eval sample once per resolution; here each is cached and previewed at
    one, the first.
    """
    if value is None or isinstance(value, int | float):
        return value, None
    parts = (value if isinstance(value, list) else str(value).split(",")) or [""]  # [] is refused below too
    areas = []
    for part in parts:
        text = str(part).strip().lower()
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", text)  # SimpleTuner's forms: digits, or digits x digits
        if not match:
            raise UserError(
                f"{config_path}: key 'validation_resolution' is {value!r}; write one number (a pixel_area "
                "resolution such as 1024), WIDTHxHEIGHT such as 1024x1024, or several, comma-separated"
            )
        width, height = float(match[1]), float(match[2] or match[1])
        areas.append(int(math.sqrt(width * height)))  # SimpleTuner's first step too: int(sqrt(area))
    if len(areas) == 1:
        return areas[0], None
    return areas[0], (
        f"validation_resolution: SimpleTuner previews every eval sample at each of {value!r}; here each is "
        f"cached and previewed once, at the first (the area of a {areas[0]}² square, each sample's aspect ratio kept)"
    )


def check_ranges(train: TrainConfig, config_path: Path) -> None:
    """Values that make no sense are refused here, before any model loads, with the key and what is allowed:
    each key's declared range (shared/config_keys.py), then the rules that join two keys."""
    check_declared_ranges(train, str(config_path))
    if train.num_train_epochs < 1 and not train.max_train_steps:
        raise UserError(
            f"{config_path}: key 'num_train_epochs' is {train.num_train_epochs!r}; it must be >= 1 when "
            "max_train_steps is 0"
        )
    if train.base_model_precision == "nf4-bnb" and train.blocks_to_swap:
        raise UserError(
            f"{config_path}: key 'blocks_to_swap' is {train.blocks_to_swap} with base_model_precision 'nf4-bnb'; "
            "bitsandbytes' 4-bit blocks cannot be swapped: remove blocks_to_swap, or use int4-quanto with it"
        )


def check_datasets(config: Config) -> None:
    path = config.backend_path
    ids = [d.id for d in config.datasets]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise UserError(f"{path}: dataset ids must be unique; repeated: {', '.join(duplicated)}")
    mains = config.main_datasets()
    if not mains:
        raise UserError(f"{path}: no main dataset (an entry without 'dataset_type', or 'dataset_type': 'image')")
    owners: dict[str, str] = {}
    for main in mains:  # two datasets in one cache dir would overwrite each other's shards
        location = config.cache_location_for(main)
        if "://" not in location and Path(location).exists() and not Path(location).is_dir():
            raise UserError(
                f"{path}: dataset '{main.id}': its cache dir {location} is a file; point cache_dir (or "
                "cache_dir_vae) at a folder, or move the file away"
            )
        key = location if "://" in location else os.path.abspath(location)
        if key in owners:
            raise UserError(
                f"{path}: datasets '{owners[key]}' and '{main.id}' both use the cache dir {location}; each main "
                "dataset needs its own: set 'cache_dir' (or 'cache_dir_vae') of one of them to another folder"
            )
        owners[key] = main.id
    if config.train.eval_dataset_id and config.train.eval_dataset_id not in [m.id for m in mains]:
        raise UserError(
            f"{config.config_path}: key 'eval_dataset_id' is '{config.train.eval_dataset_id}', "
            f"which is not a main dataset ({', '.join(m.id for m in mains)})"
        )
    flavour = FLAVOURS[config.train.model_flavour]
    for main in mains:
        where = f"{path}: dataset '{main.id}'"
        if not main.instance_data_dir:
            raise UserError(f"{where}: key 'instance_data_dir' is missing")
        if main.caption_strategy == "instanceprompt" and not main.instance_prompt:
            raise UserError(f"{where}: key 'instance_prompt' is empty but caption_strategy is 'instanceprompt'")
        if main.caption_strategy == "parquet" and not main.parquet.get("path"):
            raise UserError(f"{where}: key 'parquet' needs a 'path' (a .parquet or .jsonl caption table)")
        if main.resolution <= 0:
            raise UserError(f"{where}: key 'resolution' must be positive, got {main.resolution}")
        for cond_id in main.conditioning_data:
            if cond_id not in ids:
                raise UserError(f"{where}: key 'conditioning_data' names '{cond_id}', which is not a dataset id")
            cond = config.dataset(cond_id)
            if cond.dataset_type != "conditioning":
                raise UserError(
                    f"{path}: dataset '{cond_id}': key 'dataset_type' must be 'conditioning' "
                    f"(it is listed in the conditioning_data of '{main.id}')"
                )
            if not cond.instance_data_dir:
                raise UserError(f"{path}: dataset '{cond_id}': key 'instance_data_dir' is missing")
        n = len(main.conditioning_data)
        if not flavour.min_references <= n <= flavour.max_references:
            raise UserError(
                f"{where}: key 'conditioning_data' lists {n} reference dataset(s); "
                f"{flavour.name} takes {flavour.min_references} to {flavour.max_references}"
            )
