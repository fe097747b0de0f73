"""Stopping a run on Ctrl-C or SIGTERM (a scheduler preempting the node) without losing its work.

While training, the first SIGINT or SIGTERM only asks to stop: the loop finishes the step it is in,
every process agrees on the step to stop at, a checkpoint is written there, and the run ends with one
line naming it and the command that resumes it (exit code 130 or 143). A second Ctrl-C stops at once.
With several processes the stop is agreed at the steps whose metrics are read back anyway
(`logging_steps`, checkpoints, validations): no extra host sync on the others.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Within `with`, SIGINT and SIGTERM are recorded (`received`) instead of ending the process."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from there
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _record(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now (the last complete checkpoint stays)
        self.received = self.received or signum
        log.warning(
            "%s received: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
            signal.Signals(signum).name,
            extra={"all_ranks": True},
        )

    def agreed(self, accelerator) -> int | None:
        """The signal any process received (every process gets the same answer: with several, a collective)."""
        received = self.received or 0
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(torch.tensor([received], device=accelerator.device), "max")
            received = int(flag.item())
        return received or None
