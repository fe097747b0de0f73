"""What the `prep` and `train` command lines share: one-line errors, and loading the user's config."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from shared.config import Config, load_config
from shared.errors import UserError


@contextmanager
def user_errors() -> Iterator[None]:
    """A `UserError` inside becomes one line on stderr and exit code 1, never a traceback."""
    try:
        yield
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


def load_config_and_report(path: Path, overrides: dict[str, Any] | None = None) -> Config:
    """`load_config`, then list the keys it read past (once, on stderr)."""
    config = load_config(path, overrides)
    for line in config.ignored_report():
        typer.echo(line, err=True)
    return config
