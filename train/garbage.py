"""Python's garbage collector, run between steps instead of wherever it happens to trigger (as torchtitan does).

Loading, quantising and compiling the model leave millions of long-lived Python objects. CPython's
automatic collector runs a full pass over all of them whenever enough new objects have piled up,
which can land in the middle of a training step: the host stops launching kernels and the GPU waits.
During a run the automatic collector is off; the young generations (where a step's own garbage
lives) are collected every `every` steps, and validation collects everything before previews
(train/evaluation/validator.py). Reference counting frees everything that is not in a cycle as usual.
DataLoader workers, forked from the training process with its collector off, turn theirs back on
(`collect_in_worker`): they run no compiled code and would otherwise never free a cycle.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)
EVERY_STEPS = 50  # torchtitan's default `gc_freq`


class StepGarbageCollection:
    """Within `with`, the automatic collector is off and `after_step(step)` collects every `every` steps;
    the collector's earlier state comes back on exit."""

    def __init__(self, every: int = EVERY_STEPS):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> StepGarbageCollection:
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._collect("at the start")
        return self

    def after_step(self, step: int) -> None:
        """Collect the young generations if optimizer step `step` is one of every `every`."""
        if step % self.every == 0:
            self._collect(f"after step {step}")

    def __exit__(self, *exc) -> None:
        if self._was_enabled:
            gc.enable()

    @staticmethod
    def _collect(when: str) -> None:
        start = time.perf_counter()
        found = gc.collect(generation=1)
        log.debug("garbage collection %s: %d objects, %.3f s", when, found, time.perf_counter() - start)


def collect_in_worker(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: the worker's own automatic collector on (fork copied it off)."""
    gc.enable()
