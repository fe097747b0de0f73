"""How a config key is declared: `key(default, meaning, ...)` beside its dataclass field holds everything said
about the key (its default, what it means, the values it takes, its other spellings, and how its default
compares with SimpleTuner's). The choice and range checks, the SimpleTuner report and the README's key tables
are all read from these declarations (`shared/config_keys.py` declares the keys)."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from shared.errors import UserError


@dataclass(frozen=True)
class Range:
    """The numbers a key accepts; a float must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is refused
    high_open: bool = False
    note: str = ""  # what a boundary value means ("0: no checkpoints")
    text: str = ""  # said instead of the bounds, where they read badly (2**63)

    def allows(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self, is_float: bool) -> str:
        if self.text:
            bound = self.text
        elif self.low is not None and self.high is not None:
            bound = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bound = f"{'>' if self.low_open else '>='} {self.low}"
        else:
            bound = f"{'<' if self.high_open else '<='} {self.high}"
        bound = f"a finite number {bound}" if is_float else bound
        return f"{bound} ({self.note})" if self.note else bound


def at_least(low: float, note: str = "") -> Range:
    return Range(low=low, note=note)


def above(low: float, note: str = "") -> Range:
    return Range(low=low, low_open=True, note=note)


def between(low: float, high: float, ends: str = "[]", note: str = "", text: str = "") -> Range:
    """`ends` as in interval notation: "[)" takes low and refuses high."""
    return Range(low, high, low_open=ends[0] == "(", high_open=ends[1] == ")", note=note, text=text)


@dataclass(frozen=True)
class SimpleTuner:
    """How a key's default compares with SimpleTuner's. `default` None: the same as ours."""

    default: str | None = None
    why: str = ""  # why ours differs
    ours: str = ""  # our default in words, where its value alone does not say it


SAME = SimpleTuner()


def differs(simpletuner_default: str, why: str, ours: str = "") -> SimpleTuner:
    return SimpleTuner(simpletuner_default, why, ours)


@dataclass(frozen=True)
class Key:
    meaning: str
    choices: tuple[str, ...] = ()
    range: Range | None = None
    simpletuner: SimpleTuner | None = None  # None: ours alone, or not compared
    also: tuple[str, ...] = ()  # other spellings SimpleTuner reads as this key


def key(
    default: Any = MISSING,
    meaning: str = "",
    *,
    choices: tuple[str, ...] = (),
    range: Range | None = None,
    simpletuner: SimpleTuner | None = None,
    also: tuple[str, ...] = (),
) -> Any:
    """A dataclass field declaring one config key (a list or dict default is copied for each instance)."""
    metadata = {"key": Key(meaning, tuple(choices), range, simpletuner, tuple(also))}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def every_n_steps(
    default: int, what: str, zero: str, *, simpletuner: SimpleTuner | None = None, also: tuple[str, ...] = ()
) -> Any:
    """A key for `what` done every n optimizer steps: a whole number >= 0, 0 meaning `zero`."""
    return key(default, f"{what} every n steps", range=at_least(0, f"0: {zero}"), simpletuner=simpletuner, also=also)


def declared(cls: type) -> dict[str, tuple[Field, Key]]:
    """The keys a config dataclass declares, in declaration order: name -> (its field, its declaration)."""
    return {f.name: (f, f.metadata["key"]) for f in fields(cls) if "key" in f.metadata}


def choices_of(cls: type) -> dict[str, tuple[str, ...]]:
    return {name: k.choices for name, (_, k) in declared(cls).items() if k.choices}


def aliases_of(cls: type) -> dict[str, str]:
    """Other spelling -> the key's name."""
    return {alias: name for name, (_, k) in declared(cls).items() for alias in k.also}


def check_declared_ranges(config: Any, where: str) -> None:
    """Refuse the first value outside its key's declared range, naming the key and what is allowed."""
    for name, (_, k) in declared(type(config)).items():
        value = getattr(config, name)
        if k.range is not None and not k.range.allows(value):
            allowed = k.range.describe(isinstance(value, float))
            raise UserError(f"{where}: key '{name}' is {value!r}; it must be {allowed}")


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass(frozen=True)
class Difference:
    """A default we deliberately do not share with SimpleTuner (printed at the start of a run)."""

    key: str
    simpletuner: str
    ours: str
    why: str

    def line(self) -> str:
        return f"  {self.key}: SimpleTuner {self.simpletuner}, here {self.ours} ({self.why})"


def differences(*classes: type) -> tuple[Difference, ...]:
    found = []
    for cls in classes:
        for name, (f, k) in declared(cls).items():
            if k.simpletuner is not None and k.simpletuner.default is not None:
                ours = k.simpletuner.ours or str(default_of(f))
                found.append(Difference(name, k.simpletuner.default, ours, k.simpletuner.why))
    return tuple(found)


def same_defaults(*classes: type) -> set[str]:
    return {name for cls in classes for name, (_, k) in declared(cls).items() if k.simpletuner == SAME}


def key_table(cls: type) -> list[str]:
    """The README's table of `cls`'s keys (Markdown), one row per key, from their declarations."""
    rows = ["| key | default | values | what it does | against SimpleTuner |", "|---|---|---|---|---|"]
    for name, (f, k) in declared(cls).items():
        default = "required" if f.default is MISSING and f.default_factory is MISSING else _shown(default_of(f))
        if k.choices:
            values = ", ".join(f"`{c}`" for c in k.choices)
        elif k.range is not None:
            values = k.range.describe(str(f.type) == "float").replace("*", r"\*")
        else:
            values = {"bool": "true / false", "int": "whole number", "float": "number"}.get(str(f.type), "")
        spelled = f"`{name}`" + "".join(f" (or `{alias}`)" for alias in k.also)
        relation = ""
        if k.simpletuner == SAME:
            relation = "same default"
        elif k.simpletuner is not None:
            relation = f"SimpleTuner: {k.simpletuner.default} ({k.simpletuner.why})"
        rows.append(f"| {spelled} | {default} | {values} | {k.meaning} | {relation} |".replace("\n", " "))
    return rows


def _shown(value: Any) -> str:
    if value == "" or value == [] or value == {}:
        return "(empty)"
    return f"`{json.dumps(value)}`"
