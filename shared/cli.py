"""What the `prep` and `train` command lines share: one-line errors, loading the user's config, and leaving
torch.distributed's process group before the process exits."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from shared import config_report, simpletuner
from shared.config import Config, load_config
from shared.errors import InternalError, Stopped, UserError


@contextmanager
def user_errors() -> Iterator[None]:
    """A `UserError` inside becomes one line on stderr and exit code 1, never a traceback; a `Stopped` its line
    and 128 + the signal's number. Anything else is a bug: one line that says so and where the full traceback
    was written, and exit code 2."""
    try:
        yield
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except Stopped as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(err.exit_code) from None
    except (KeyboardInterrupt, SystemExit, typer.Exit):
        raise
    except InternalError as err:
        log = write_crash_log()
        typer.echo(
            f"error: internal error: {err}. This is a bug, not your data or config; please report it with {log}",
            err=True,
        )
        raise typer.Exit(2) from None
    except Exception as err:  # noqa: BLE001 - the last line of defence: log it, say so in one line
        log = write_crash_log()
        typer.echo(
            f"error: internal error ({type(err).__name__}: {err}); this is a bug, please report it with the log {log}",
            err=True,
        )
        raise typer.Exit(2) from None


@contextmanager
def leaving_process_group() -> Iterator[None]:
    """Destroy torch.distributed's process group, if the command joined one, when the command ends, however it
    ends. A process that exits with it alive can abort at interpreter shutdown (gloo's threads still hold
    tensors: SIGABRT, "terminate called without an active exception", pytorch/pytorch#190489), which torchrun
    reports as a failed run after all the work succeeded."""
    try:
        yield
    finally:
        if "torch.distributed" in sys.modules:  # a command that never imported torch joined nothing
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def write_crash_log() -> Path:
    """The current exception's traceback, with the command line, in a log file; returns its path."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen-edit-trainer" / "logs"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(f"command: {' '.join(sys.argv)}\n\n{traceback.format_exc()}", encoding="utf-8")
    return path


def load_config_and_report(
    path: Path, overrides: dict[str, Any] | None = None, announce: bool = False, print_config: bool = False
) -> Config:
    """`load_config`, then list the keys it read past (once, on stderr). `announce`: also the defaults that
    differ from SimpleTuner's (`prep validate` and `train run` say them once); `print_config`: every resolved
    setting and where it came from."""
    config = load_config(path, overrides)
    lines = config_report.notes(config) + config_report.ignored_report(config)
    if announce:
        lines = simpletuner.differences_report() + lines
    for line in lines:
        typer.echo(line, err=True)
    if print_config:
        typer.echo("\n".join(config_report.resolved(config)))
    return config
