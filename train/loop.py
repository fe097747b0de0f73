"""`train run`: the LoRA training loop, run through accelerate (one GPU, several, several nodes, or CPU).

Build the run once (`train.run.Run`: caches, model, optimizer, registry, validator; resumed when asked),
preview the base model (step 0), then repeat: the optimizer step (accumulated micro-batches; a
non-finite loss skips the update on every rank, on the device), the metrics (read back every
`logging_steps`), Python's garbage collection at set steps (train/garbage.py), the held-out loss and
previews when due, the periodic checkpoint, a stop asked for by Ctrl-C or SIGTERM (with a
checkpoint); at the end export the LoRA (and its EMA) in diffusers and ComfyUI formats.
"""

from __future__ import annotations

import signal
from pathlib import Path

from shared.config import Config
from shared.errors import Stopped
from train.garbage import StepGarbageCollection
from train.interrupts import Interrupted, StopSignals
from train.run import Run
from train.timing import STATS_FILE, PhaseTimer


def train(config: Config) -> Path:
    """Train a LoRA as `config` says; return the path of the diffusers LoRA file. Ctrl-C or SIGTERM stops it
    after the current step with a checkpoint there (train/interrupts.py), raising `Stopped`."""
    timer = PhaseTimer()
    run = None
    with StopSignals() as signals, StepGarbageCollection() as garbage:
        try:
            run = Run(config)
            timer.write_to(run.output_dir / STATS_FILE if run.accelerator.is_main_process else None)
            timer.done("setup", run.step_count)
            if run.step_count == 0:  # the baseline: what the base model does before any training
                run.validate(0, baseline=True)
                timer.done("baseline validation")
            signals.training(run.accelerator)
            while run.step_count < run.max_steps:
                run.step()
                step, last = run.step_count, run.step_count == run.max_steps
                checkpoint_due, validation_due = run.checkpoint_due(step, last), run.validation_due(step, last)
                flush = step % run.cfg.logging_steps == 0 or last or checkpoint_due or validation_due
                if flush:  # the one host sync
                    run.flush_metrics()
                timer.stepped(step, synced=flush)
                garbage.after_step(step)
                if validation_due:
                    run.validate(step, last)
                    timer.done("validation", step)
                if checkpoint_due:
                    run.save_checkpoint(step)
                    timer.done("checkpoint", step)
                if (signum := signals.agreed()) and not last:
                    if not flush:
                        run.flush_metrics()  # the steps since the last read-back reach the logs
                    kept = run.save_checkpoint(step) if not checkpoint_due else run.last_checkpoint()
                    run.metrics.close()  # the CSVs, loss.png and the trackers, as a finished run leaves them
                    raise Stopped(signum, run.resume_line(signal.Signals(signum).name, step, kept))
            lora = run.finish()
        except Interrupted as stop:  # before training began (nothing to save), or a second Ctrl-C
            name = signal.Signals(stop.signum).name
            if run is None or run.step_count == 0:
                what = f"stopped by {name} before training began; nothing to save (to start again, run the same command"
                raise Stopped(
                    stop.signum, what + " with --overwrite: the folder now names this unstarted run)"
                ) from None
            raise Stopped(stop.signum, run.resume_line(name, run.step_count, None)) from None
    timer.report()
    return lora
