"""The `train` command line."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from shared.cli import leaving_process_group, load_config_and_report, user_errors
from shared.errors import UserError
from shared.logs import setup_logging

app = typer.Typer(help="Train Qwen-Image-Edit LoRAs from a prep cache.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Train LoRAs for qwen-edit-trainer."""
    setup_logging()


def use_expandable_segments() -> None:
    """Let CUDA memory segments grow instead of caching fixed blocks: peak reserved memory then stays near
    peak allocated, which the memory modes size against (fixed blocks of varying shapes fragment: a
    card 5 GiB short of its budget can still fail to find 400 MiB). CUDA reads this setting when it
    starts, so call this before the first CUDA call; a PYTORCH_CUDA_ALLOC_CONF the user set wins."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


@app.command("run")
def run_command(
    config: Path = typer.Option(..., "--config", help="config.json (the same one prep build-cache used)"),
    output_dir: str = typer.Option(None, help="overrides output_dir"),
    max_train_steps: int = typer.Option(None, help="overrides max_train_steps"),
    pretrained_model_name_or_path: str = typer.Option(None, help="overrides pretrained_model_name_or_path"),
    resume_from_checkpoint: str = typer.Option(None, help="'latest' or a checkpoint dir; overrides the config"),
    memory_mode: str = typer.Option(None, help="auto, fast, balanced, low or minimal; overrides memory_mode"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start a new run in an output_dir holding another"),
    print_config: bool = typer.Option(
        False,
        "--print-config",
        help="print every setting and where it came from (file, default, command line), then stop",
    ),
) -> None:
    """Train a LoRA; it is saved in <output_dir> in diffusers and ComfyUI formats (and <output_dir>/ema)."""
    use_expandable_segments()
    from train.loop import train

    overrides = {
        k: v
        for k, v in {
            "output_dir": output_dir,
            "max_train_steps": max_train_steps,
            "pretrained_model_name_or_path": pretrained_model_name_or_path,
            "resume_from_checkpoint": resume_from_checkpoint,
            "memory_mode": memory_mode,
            "overwrite_output_dir": overwrite or None,
        }.items()
        if v is not None
    }
    with user_errors(), leaving_process_group():
        cfg = load_config_and_report(config, overrides, announce=not print_config, print_config=print_config)
        if print_config:
            return
        lora = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line, also when launched on several processes
        typer.echo(f"LoRA saved: {lora}")


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="a checkpoint dir (<output_dir>/checkpoints/checkpoint-NNNNNN)"),
    format: str = typer.Option("diffusers", "--format", help="diffusers or comfyui"),
    out: Path = typer.Option(None, help="where to write (default: the checkpoint dir)"),
    ema: bool = typer.Option(False, help="export the EMA weights instead"),
) -> None:
    """Write a checkpoint's LoRA in diffusers (load_lora_weights) or ComfyUI format."""
    from shared.flavours import FLAVOURS
    from train import export
    from train.checkpoint import read_lora

    with user_errors():
        if format not in export.FORMATS:
            raise UserError(f"--format {format!r}: use one of {', '.join(export.FORMATS)}")
        if not (checkpoint / "trainer_state.json").is_file():
            raise UserError(f"{checkpoint}: not a checkpoint (no trainer_state.json)")
        state, lora_config, flavour = read_lora(checkpoint, ema=ema)
        path = export.save(state, lora_config, format, out or checkpoint, FLAVOURS[flavour])
    typer.echo(f"{format} LoRA written: {path}")


if __name__ == "__main__":
    app()
