"""Messages come from rank 0; a warning that differs per rank comes from every rank, saying which."""

from __future__ import annotations

import logging

from shared.logs import setup_logging


def test_other_ranks_only_show_messages_marked_for_every_rank(capsys):
    log = logging.getLogger("train.some_module")
    setup_logging(rank=1)
    log.info("training 10 steps")
    log.warning("warning: skipped unreadable sample x", extra={"all_ranks": True})
    assert capsys.readouterr().out.splitlines() == ["[rank 1] warning: skipped unreadable sample x"]
    setup_logging(rank=0)
    log.info("training 10 steps")
    assert capsys.readouterr().out.splitlines() == ["training 10 steps"]
