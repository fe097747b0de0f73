"""`build_cache` in a process of its own, to be killed -9 mid-build: forked from a server that imported the
build once, so each such process starts in milliseconds, not the ~4 s of CPU (8 s on a busy 2-core box) a
fresh interpreter takes to import torch, transformers and diffusers. The child is a real, separate process
that runs the whole build (config, validation, encoders, shards) as `prep build-cache` does, and dies as a
killed build does: only the imports are shared.

The server (multiprocessing's forkserver) never runs torch itself, so its forks start clean (no thread pool
to inherit), and they inherit its environment, hence the test's OMP_NUM_THREADS: the same thread count as a
build in the test process, so the same bytes."""

from __future__ import annotations

import multiprocessing
import os

from prep.build import build_cache
from shared.config import load_config

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])


def _build(config_path: str, kwargs: dict) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)  # as the subprocess it replaces, run with stdout/stderr DEVNULL
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    build_cache(load_config(config_path), **kwargs)


def start_build(config_path, **kwargs) -> multiprocessing.Process:
    """Start `build_cache(load_config(config_path), **kwargs)` in a process of its own; return it."""
    process = _CONTEXT.Process(target=_build, args=(str(config_path), kwargs), daemon=True)
    process.start()
    return process
