"""Rank-aware logging for the command lines: messages from the main process, warnings from any rank that asks.

Modules log with `logging.getLogger(__name__)`. On a process other than rank 0 a record is shown only
when it is logged with `extra={"all_ranks": True}` (a warning whose content differs per rank), and then
prefixed with its rank. Records go to the current `sys.stdout` (looked up at each record, so output
captured by a test or redirected later still receives them).
"""

from __future__ import annotations

import logging
import sys

_HANDLER_NAME = "qwen-edit-trainer"
# bitsandbytes (the nf4-bnb extra) warns when it is imported, on CPUs with AVX512-bf16, that an optional CPU kernel
# package is missing: it changes nothing here (training runs on the GPU; CPU runs take its plain path).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _CurrentStdout(logging.StreamHandler):
    """Writes through `tqdm.write`, which moves an active progress bar below the line instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always answers
        pass


class RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if getattr(record, "all_ranks", False):
            record.msg = f"[rank {self.rank}] {record.msg}"
            return True
        return False


def setup_logging(rank: int = 0) -> None:
    """Show INFO and above of this package's modules as plain lines, filtered for `rank` (idempotent)."""
    for name in ("prep", "train", "shared"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
            logger.removeHandler(handler)
        handler = _CurrentStdout()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RankFilter(rank))
        logger.addHandler(handler)
