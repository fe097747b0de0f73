"""Stopping a run on Ctrl-C or SIGTERM (a scheduler preempting the node) without losing its work.

Before training begins there is nothing to save: the first signal stops the command at once. While
training, the first SIGINT or SIGTERM only asks to stop: the loop finishes the step it is in, every
process agrees on the step to stop at, a checkpoint is written there, and the run ends with one line
naming it and the command that resumes it (exit code 130 or 143). A second Ctrl-C stops at once.

With several processes the processes agree through a small all-reduce of each one's flag on a CPU
(gloo) group, started after every step and read one step later: no GPU sync, and a stop lands
within two steps of the signal (plus the checkpoint's few seconds). A validation in progress
finishes first. Schedulers kill what has not ended some time after SIGTERM (torchrun: 30 s,
`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`; SLURM: `KillWait`): give them room for a step and a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop at once: a signal before training began, or a second Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Within `with`, SIGINT and SIGTERM are recorded (`received`) once training has begun (`training()`);
    before that they stop the command at once (`Interrupted`)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._training = False
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()  # DataLoader workers forked later inherit the handler: they ignore it
        self._group = None  # the CPU group the processes agree through (several processes)
        self._flag = torch.zeros(1, dtype=torch.int64)
        self._pending = None  # the all-reduce started after the last step

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set from there
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def training(self, accelerator) -> None:
        """From now on a signal asks for a stop with a checkpoint (collective: every process calls it)."""
        if accelerator.num_processes > 1:
            self._group = dist.new_group(backend="gloo")
        self._training = True

    def _record(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker: the main process stops it
        if not self._training or (self.received is not None and signum == signal.SIGINT):
            raise Interrupted(signum)  # nothing to save yet, or asked twice: stop now (checkpoints stay)
        self.received = self.received or signum
        log.warning(
            "%s received: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
            signal.Signals(signum).name,
            extra={"all_ranks": True},
        )

    def agreed(self) -> int | None:
        """The signal any process received, the same answer on every process; call it after every step.
        One process: at once. Several: the flags as they stood one call earlier."""
        if self._group is None:
            return self.received
        agreed = 0
        if self._pending is not None:
            self._pending.wait()  # a CPU all-reduce started a step ago: long done
            agreed = int(self._flag.item())
        self._flag = torch.tensor([self.received or 0], dtype=torch.int64)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed or None
