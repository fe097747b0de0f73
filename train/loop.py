"""`train run`: the LoRA training loop, run through accelerate (one GPU, several, several nodes, or CPU).

Build the run once (`train.run.Run`: caches, model, optimizer, registry, validator; resumed when asked),
preview the base model (step 0), then repeat: the optimizer step (accumulated micro-batches; a
non-finite loss skips the update on every rank, on the device), the metrics (read back every
`logging_steps`), the held-out loss and previews when due, the periodic checkpoint, a stop asked for by
Ctrl-C or SIGTERM (with a checkpoint); at the end export the LoRA (and its EMA) in diffusers and ComfyUI formats.
"""

from __future__ import annotations

import signal
from pathlib import Path

from shared.config import Config
from shared.errors import Stopped
from train.interrupts import StopSignals
from train.run import Run
from train.timing import STATS_FILE, PhaseTimer


def train(config: Config) -> Path:
    """Train a LoRA as `config` says; return the path of the diffusers LoRA file. Ctrl-C or SIGTERM stops it
    after the current step with a checkpoint there (train/interrupts.py), raising `Stopped`."""
    timer = PhaseTimer()
    with StopSignals() as signals:
        run = Run(config)
        timer.write_to(run.output_dir / STATS_FILE if run.accelerator.is_main_process else None)
        timer.done("setup", run.step_count)
        if run.step_count == 0:  # the baseline: what the base model does before any training
            run.validate(0, baseline=True)
            timer.done("baseline validation")
        if signum := signals.agreed(run.accelerator):
            raise Stopped(signum, f"stopped by {signal.Signals(signum).name} before training began; nothing to save")
        every_step = run.accelerator.num_processes == 1  # one process: no collective needed to agree on a stop
        while run.step_count < run.max_steps:
            run.step()
            step, last = run.step_count, run.step_count == run.max_steps
            checkpoint_due, validation_due = run.checkpoint_due(step, last), run.validation_due(step, last)
            flush = step % run.cfg.logging_steps == 0 or last or checkpoint_due or validation_due
            if flush:  # the one host sync
                run.flush_metrics()
            timer.stepped(step, synced=flush)
            if validation_due:
                run.validate(step, last)
                timer.done("validation", step)
            if checkpoint_due:
                run.save_checkpoint(step)
                timer.done("checkpoint", step)
            if (flush or every_step) and not last and (signum := signals.agreed(run.accelerator)):
                if not flush:
                    run.flush_metrics()  # the steps since the last read-back reach the logs
                kept = run.save_checkpoint(step) if not checkpoint_due else run.last_checkpoint()
                raise Stopped(signum, run.resume_line(signal.Signals(signum).name, step, kept))
        lora = run.finish()
    timer.report()
    return lora
