"""Typed values from a config file's raw ones: SimpleTuner writes numbers and flags as strings ("1e-4",
"true"), lists as JSON text; each is converted to its field's type or refused naming the file and the key."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from shared import simpletuner
from shared.config_declare import choices_of
from shared.errors import UserError


def fill_fields(target: Any, raw: dict, where: str, ignored: list[str]) -> Any:
    """Copy the known keys of `raw` onto the dataclass `target`, checking each value's type and its declared
    choices (shared/config_keys.py); the keys it does not have are added to `ignored` as \"where: key\"."""
    known = {f.name: f for f in fields(target)}
    choices = choices_of(type(target))
    for key, value in raw.items():
        key = key.removeprefix("--")
        if value is None and key in known:  # JSON null: unset, the default applies (as in SimpleTuner)
            continue
        if key not in known:
            ignored.append(f"{where}: {key}")
            continue
        default = getattr(target, key)
        if key == "lora_target" and isinstance(value, str) and value.strip().startswith("["):
            value = _json_list(value, key, where)  # SimpleTuner's peft_lora_target_modules: a JSON array
        if key == "lora_target" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            setattr(target, key, value)  # an explicit module list instead of a preset
            continue
        value = _coerce(value, default, key, where)
        if key == "optimizer":
            value = simpletuner.OPTIMIZER_NAMES.get(value, value)  # SimpleTuner's names of the same optimizer
        setattr(target, key, value)
        if key in choices and value not in choices[key]:
            refused = simpletuner.REFUSED_VALUES
            hint = refused.get((key, value)) or refused.get((key, "*"))
            allowed = ", ".join(repr(c) for c in choices[key])
            raise UserError(f"{where}: key '{key}' is {value!r}; " + (hint or f"use one of {allowed}"))
    return target


SIZE_KEYS = {"resolution", "minimum_image_size"}


def _coerce(value: Any, default: Any, key: str, where: str) -> Any:
    """Convert `value` to the type of `default`, accepting the string forms SimpleTuner configs use."""
    try:
        if key in SIZE_KEYS:  # pixels, or megapixels with resolution_type "area" (0.5): whole numbers stay ints
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            return int(number) if number.is_integer() else number
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, float):
                if not value.is_integer():  # 0.5 must not become 0 (checkpointing_steps 0.5 is not "off")
                    raise ValueError
                return int(value)
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, list):
            if isinstance(value, (str, list)):
                return value
            raise ValueError
        if isinstance(default, dict):
            if isinstance(value, dict):
                return value
            raise ValueError
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        kind = {"int": "whole number", "float": "number", "bool": "true or false"}.get(type(default).__name__)
        raise UserError(f"{where}: key '{key}' is {value!r}; expected {kind or type(default).__name__}") from None


def _json_list(value: str, key: str, where: str) -> list:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise UserError(f"{where}: key '{key}' is {value!r}; expected a JSON array of module names") from None
    if not isinstance(parsed, list):
        raise UserError(f"{where}: key '{key}' is {value!r}; expected a JSON array of module names")
    return parsed
