"""Reading the user's config files as SimpleTuner reads them: JSON with comments, TOML, config.env, and the
placeholders SimpleTuner expands in string values."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from shared import config_env
from shared.errors import UserError


def _one_value_per_key(pairs: list[tuple[str, Any]], path: Path) -> dict[str, Any]:
    """A JSON object's keys, refusing one given twice (JSON would keep the last without a word)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise UserError(
                f"{path}: key '{key}' is given twice in one object ({json.dumps(seen[key])} and {json.dumps(value)}); "
                "keep the one you mean"
            )
        seen[key] = value
    return seen


def read_config_file(path: Path, expect: type) -> Any:
    """A config file as SimpleTuner reads it: JSON (with `//` and `/* */` comments, as its guides write
    them; UTF-8 or UTF-16), TOML for a `.toml` file, or SimpleTuner's `config.env` (`export NAME=value` lines,
    its variable names and TRAINER_EXTRA_ARGS)."""
    if not path.is_file():
        raise UserError(f"{path}: file not found (paths are relative to the directory you run from)")
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a BOM, as some Windows editors save
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if path.suffix == ".toml":
        data = _parse_toml(text, path)
    elif path.suffix == ".env":
        data, unknown = config_env.env_to_config(config_env.parse_env_file(text, str(path)))
        data.update({f"{name} (config.env variable)": None for name in unknown})  # reported as read past
    else:
        try:
            refuse_repeats = lambda pairs: _one_value_per_key(pairs, path)  # noqa: E731
            data = json.loads(strip_json_comments(text), object_pairs_hook=refuse_repeats)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, expect):
        kind = "table" if path.suffix == ".toml" and expect is dict else f"JSON {expect.__name__}"
        raise UserError(f"{path}: expected a {kind} at the top level")
    return data


def _parse_toml(text: str, path: Path) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise UserError(f"{path}: reading TOML needs Python 3.11 or later; or write the keys as config.json") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML ({err})") from None


def strip_json_comments(text: str) -> str:
    """`text` without `// ...` and `/* ... */` comments outside strings (line breaks kept, so JSON errors
    still name the right line)."""
    out, i, n = [], 0, len(text)
    in_string = False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
            out.append(c)
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
            continue
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append("\n" * text.count("\n", i, end))
            i = end
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


_PLACEHOLDER = re.compile(r"\{(model_family|output_dir|id|env:([A-Za-z_][A-Za-z0-9_]*))\}")


def expand_placeholders(entry: dict, variables: dict[str, str], where: str) -> dict:
    """String values with SimpleTuner's placeholders filled in: `{env:NAME}` (an environment variable;
    unset is an error naming it, where SimpleTuner writes "") and those of `variables`, as SimpleTuner
    fills them (`{model_family}` everywhere; in multidatabackend.json also `{output_dir}` and `{id}`,
    the dataset's own id). A placeholder `variables` lacks stays as written, as in SimpleTuner."""

    def fill(value: Any, key: str) -> Any:
        if isinstance(value, list):
            return [fill(v, key) for v in value]
        if not isinstance(value, str):
            return value

        def one(match: re.Match) -> str:
            if match[2] is None:
                return variables.get(match[1], match[0])
            if match[2] not in os.environ:
                raise UserError(f"{where}: key '{key}' uses {{env:{match[2]}}}, but {match[2]} is not set")
            return os.environ[match[2]]

        return _PLACEHOLDER.sub(one, value)

    return {k: fill(v, k) for k, v in entry.items()}
