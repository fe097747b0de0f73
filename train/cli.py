"""The `train` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from shared.config import load_config
from shared.errors import UserError

app = typer.Typer(help="Train Qwen-Image-Edit LoRAs from a prep cache.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Train LoRAs for qwen-edit-trainer."""


@app.command("run")
def run_command(
    config: Path = typer.Option(..., "--config", help="config.json (the same one prep build-cache used)"),
    output_dir: str = typer.Option(None, help="overrides output_dir"),
    max_train_steps: int = typer.Option(None, help="overrides max_train_steps"),
    pretrained_model_name_or_path: str = typer.Option(None, help="overrides pretrained_model_name_or_path"),
) -> None:
    """Train a LoRA; it is saved as <output_dir>/pytorch_lora_weights.safetensors (diffusers format)."""
    from train.loop import train

    overrides = {
        k: v
        for k, v in {
            "output_dir": output_dir,
            "max_train_steps": max_train_steps,
            "pretrained_model_name_or_path": pretrained_model_name_or_path,
        }.items()
        if v is not None
    }
    try:
        cfg = load_config(config, overrides)
        for line in cfg.ignored_report():
            typer.echo(line, err=True)
        lora = train(cfg)
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    from accelerate import PartialState

    if PartialState().is_main_process:
        typer.echo(f"LoRA saved: {lora}")


if __name__ == "__main__":
    app()
