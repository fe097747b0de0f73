"""Where a run's time and memory go, measured inside `train run` itself (what bench/product.py reports).

Phases: setup (caches, model load, quantisation, placement), the baseline validation, the training
steps, validations and checkpoints. For each: wall seconds and the peak GPU memory reserved while it
ran. Plus the time from the process's start to the end of the first step (imports, setup and
compilation included), the steady seconds per step (steps after the first two, between host syncs,
with no validation or checkpoint inside), and the host's peak resident memory.

Clocks are read only where the loop already waits for the device (a phase's end, a metrics flush), so
measuring adds no host sync to the training step. `<output_dir>/run_stats.json` is rewritten after
every phase (so a run that crashed or was killed still says where its time and memory went) and the
whole is logged once at the end.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import psutil
import torch

log = logging.getLogger(__name__)
STATS_FILE = "run_stats.json"
WARMUP_STEPS = 2  # the first steps compile the training graphs (and may see new prompt layouts)
GIB = 2**30


class PhaseTimer:
    def __init__(self):
        self.process_start = psutil.Process().create_time()  # wall clock (s since the epoch)
        self.mark = time.perf_counter()
        self.mark_step = 0
        self.seconds: dict[str, float] = {}
        self.peak_reserved_gib: dict[str, float] = {}
        self.steady = [0.0, 0]  # seconds, steps over the windows counted as steady
        self.first_step: int | None = None  # the first step this process ran (later than 1 when resumed)
        self.first_step_since_start = float("nan")
        self.path: Path | None = None
        self._reset_peak()

    def write_to(self, path: Path | None) -> None:
        """Keep the stats in `path` (None: on another process than the main one, keep none)."""
        self.path = path

    def done(self, phase: str, step: int = 0) -> None:
        """A phase other than training steps just ended, after optimizer step `step` (the device is waited for)."""
        self._sync()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.mark
        self._note_peak(phase)
        self.mark, self.mark_step = now, step
        self._write()

    def stepped(self, step: int, synced: bool) -> None:
        """Optimizer step `step` was queued; `synced`: the host has just waited for it (a metrics flush)."""
        first = self.first_step is None
        if first:
            self._sync()
            self.first_step = step
            self.first_step_since_start = time.time() - self.process_start
            log.info("first step done %.1f s after the command started", self.first_step_since_start)
        elif not synced:
            return
        now = time.perf_counter()
        self.seconds["training steps"] = self.seconds.get("training steps", 0.0) + now - self.mark
        self._note_peak("training steps")
        if not first and self.mark_step >= self.first_step - 1 + WARMUP_STEPS:
            self.steady[0] += now - self.mark
            self.steady[1] += step - self.mark_step
        self.mark, self.mark_step = now, step
        if first:
            self._write()

    def stats(self) -> dict:
        seconds, steps = self.steady
        return {
            "first_step_since_start_s": self.first_step_since_start,
            "steady_s_per_step": seconds / steps if steps else float("nan"),
            "steady_steps": steps,
            "phase_s": self.seconds,
            "peak_reserved_gib": self.peak_reserved_gib,
            "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        }

    def report(self) -> dict:
        """Log the whole run's stats (and write them); return them."""
        stats = self.stats()
        peaks = ", ".join(f"{k} {v:.1f}" for k, v in self.peak_reserved_gib.items())
        log.info(
            "run stats: first step done %.1f s after start (setup %.1f s); steady %.3f s/step over %d steps; "
            "peak GPU reserved GiB: %s; host peak RSS %.1f GiB",
            stats["first_step_since_start_s"],
            self.seconds.get("setup", float("nan")),
            stats["steady_s_per_step"],
            stats["steady_steps"],
            peaks or "no GPU",
            stats["host_peak_rss_gib"],
        )
        self._write()
        return stats

    def _write(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self.stats(), indent=1) + "\n")

    def _note_peak(self, phase: str) -> None:
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_reserved() / GIB
            self.peak_reserved_gib[phase] = max(self.peak_reserved_gib.get(phase, 0.0), peak)
        self._reset_peak()

    @staticmethod
    def _reset_peak() -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
