"""Each config key is declared once (shared/config_keys.py): the README's tables, the choice and range checks
and the SimpleTuner report all follow its declaration."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from shared.config import load_config
from shared.config_declare import declared
from shared.config_keys import DatasetConfig, TrainConfig, readme_with_tables
from shared.errors import UserError
from shared.simpletuner import differences_report

README = Path(__file__).parents[2] / "README.md"
RANGED = [name for name, (_, k) in declared(TrainConfig).items() if k.range is not None and k.range.low is not None]
CHOSEN = [name for name, (_, k) in declared(TrainConfig).items() if k.choices]


def test_the_readmes_key_tables_are_the_declarations():
    text = README.read_text()
    assert readme_with_tables(text) == text, "README's key tables are stale: run `python -m shared.config_keys`"
    for cls in (TrainConfig, DatasetConfig):
        for f in fields(cls):
            assert f"| `{f.name}`" in text, f.name


def test_every_key_is_declared_with_what_it_means():
    for cls in (TrainConfig, DatasetConfig):
        assert [f.name for f in fields(cls)] == list(declared(cls))
        assert all(k.meaning for _, k in declared(cls).values())


def _config(tmp_path: Path, keys: dict) -> Path:
    backend = tmp_path / "multidatabackend.json"
    backend.write_text(
        json.dumps(
            [
                {"id": "edits", "instance_data_dir": "data", "conditioning_data": ["refs"]},
                {"id": "refs", "instance_data_dir": "refs", "dataset_type": "conditioning"},
            ]
        )
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"data_backend_config": str(backend), **keys}))
    return path


@pytest.mark.parametrize("name", RANGED)
def test_a_value_below_a_keys_declared_range_is_refused_naming_the_key(tmp_path, name):
    low = declared(TrainConfig)[name][1].range.low
    value = low - 1 if isinstance(getattr(TrainConfig(), name), int) else float(low) - 0.5
    with pytest.raises(UserError, match=rf"key '{name}' is .*; it must be"):
        load_config(_config(tmp_path, {name: value}))


@pytest.mark.parametrize("name", CHOSEN)
def test_a_value_outside_a_keys_declared_choices_is_refused_naming_the_key(tmp_path, name):
    with pytest.raises(UserError, match=rf"key '{name}' is 'no-such-value'"):
        load_config(_config(tmp_path, {name: "no-such-value"}))


def test_a_default_declared_as_differing_from_simpletuners_is_printed_at_the_start_of_a_run():
    report = "\n".join(differences_report())
    for name, (_, k) in declared(TrainConfig).items():
        differs = k.simpletuner is not None and k.simpletuner.default is not None
        assert (f"  {name}: SimpleTuner " in report) == differs, name
