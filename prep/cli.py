"""The `prep` command line."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from shared.cli import leaving_process_group, load_config_and_report, user_errors
from shared.errors import Stopped, UserError
from shared.logs import setup_logging

app = typer.Typer(help="Validate edit-pair datasets and build the cache that `train` reads.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Prepare caches for qwen-edit-trainer."""
    setup_logging()


@app.command("validate")
def validate_command(
    config: Path = typer.Option(..., "--config", help="config.json (its data_backend_config names the datasets)"),
    json_path: Path = typer.Option(None, "--json", help="also write the full report (every finding) as JSON here"),
    limit: int = typer.Option(10, help="lines shown per kind of problem; --json lists all"),
    print_config: bool = typer.Option(False, "--print-config", help="also print every setting and where it came from"),
) -> None:
    """Check pairing, captions and images of every dataset; exit 0 when trainable, 1 when not."""
    from prep.validate import validate

    with user_errors():
        cfg = load_config_and_report(config, announce=True, print_config=print_config)
        report = validate(cfg)
    typer.echo(report.render(limit))
    if json_path:
        report.write_json(json_path)
        typer.echo(f"full report: {json_path}")
    raise typer.Exit(0 if report.trainable else 1)


@app.command("build-cache")
def build_cache_command(
    config: Path = typer.Option(..., "--config", help="config.json (its data_backend_config names the datasets)"),
    device: str = typer.Option("", help="cuda, cuda:1, cpu, ... (default: cuda if available)"),
    dtype: str = typer.Option("auto", help="encoder precision: auto (bf16 on GPU, fp32 on CPU), bf16, fp32"),
    force: bool = typer.Option(False, "--force", help="rebuild a cache that was built with other settings"),
    workers: int = typer.Option(None, help="image decoding processes (default: 8 on a GPU, 0 on CPU)"),
    batch_size: int = typer.Option(None, help="encoder batch, same shapes only (default: 4 on a GPU, 1 on CPU)"),
    engine: str = typer.Option(
        None, help="local (this machine's GPUs) or ray (Ray Data: a pool of encoders); default: prep_engine (local)"
    ),
    ray_address: str = typer.Option(
        None, help="--engine ray: the Ray cluster to join (default: ray_address, RAY_ADDRESS, else a local Ray)"
    ),
) -> None:
    """Validate the datasets, then encode VAE latents and Qwen2.5-VL embeddings into the cache."""
    from prep.build import build_cache, default_device

    with user_errors(), leaving_process_group(), stops_said(config):
        check_build_flags(device, workers, batch_size)
        cfg = load_config_and_report(config)
        caches = build_cache(
            cfg,
            device=device or default_device(),
            dtype=dtype,
            force=force,
            workers=workers,
            batch_size=batch_size,
            engine=engine or cfg.train.prep_engine,
            ray_address=cfg.train.ray_address if ray_address is None else ray_address,
        )
    if int(os.environ.get("RANK", "0")) == 0:  # one line per cache, also when launched on several ranks
        for cache in caches:
            typer.echo(f"cache ready: {cache}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job), raised where Ctrl-C would be, so the build ends the same way."""


@contextmanager
def stops_said(config: Path) -> Iterator[None]:
    """Ctrl-C or SIGTERM during a build: the open shard is sealed as the build unwinds (prep/encode_workers.py), then
    one line says what is kept and how to go on."""

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except KeyboardInterrupt as stop:
        signum = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
        raise Stopped(
            signum,
            f"stopped by {signal.Signals(signum).name}: every sample encoded so far is kept in sealed shards; run "
            f"the same `prep build-cache --config {config} ...` again to encode only the rest",
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_build_flags(device: str, workers: int | None, batch_size: int | None) -> None:
    """`build-cache` flags out of range are refused before anything loads."""
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: use 1 or more")
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers}: use 0 (decode in the main process) or more")
    if device and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"--device {device!r}: use cpu, cuda or cuda:N")


@app.command("verify")
def verify_command(
    cache: str = typer.Argument(..., help="a cache dir or URL (s3://..., gs://...) holding cache.json"),
    quick: bool = typer.Option(False, "--quick", help="only check that every shard exists with its recorded size"),
) -> None:
    """Check every byte of every shard against what the build sealed; exit 0 intact, 1 corrupt or missing."""
    from prep.verify import verify_cache

    with user_errors():
        result = verify_cache(cache, quick=quick)
    for line in result.notes + result.problems:
        typer.echo(line)
    status = "intact" if result.intact else f"{len(result.problems)} problem(s)"
    checked = "sizes checked" if quick else f"{result.bytes_checked / 2**20:.1f} MiB checked"
    typer.echo(f"{cache}: {result.samples} samples in {result.shards} shards, {checked}: {status}")
    raise typer.Exit(0 if result.intact else 1)


@app.command("inspect")
def inspect_command(cache: str = typer.Argument(..., help="a cache dir or URL holding cache.json")) -> None:
    """Print counts, buckets, token-length histogram, bytes and the fingerprint of a cache."""
    from prep.inspect_cache import describe_cache

    with user_errors():
        typer.echo(describe_cache(cache))


if __name__ == "__main__":
    app()
