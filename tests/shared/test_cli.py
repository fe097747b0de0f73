"""What the command lines print when something goes wrong: one line, never a traceback on the terminal."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import prep.verify
from prep.cli import app
from train.cli import app as train_app


def test_an_internal_error_is_one_line_naming_a_log_that_holds_the_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("shard_table")

    monkeypatch.setattr(prep.verify, "verify_cache", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert "internal error (KeyError: 'shard_table'); this is a bug, please report it with the log" in line
    (log,) = (tmp_path / "qwen-edit-trainer" / "logs").glob("crash-*.log")
    assert str(log) in line
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "KeyError: 'shard_table'" in text and "verify" in text


def test_a_user_error_is_one_clear_line_with_exit_code_1(tmp_path):
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: not a cache (no cache.json); build it with `prep build-cache`"
    ]


def test_ranks_that_disagree_are_reported_as_a_bug_not_as_the_users_mistake(tmp_path, monkeypatch):
    """An invariant of ours that breaks (here: processes ending with different LoRA weights) says it is a bug,
    points at the crash log and exits 2, unlike a UserError (exit 1, "error: <what to fix>")."""
    import torch

    import train.run
    from shared.errors import InternalError

    class TwoRanks:  # what check_ranks_agree sees of accelerate: two processes whose sums differ
        num_processes, device = 2, torch.device("cpu")

        def gather(self, sums):
            return torch.cat([sums, sums + 1])

    params = {"w": torch.nn.Parameter(torch.ones(2))}
    try:
        train.run.check_ranks_agree(TwoRanks(), params)
    except InternalError as err:
        raised = err
    assert isinstance(raised, InternalError)

    def disagreeing(*args, **kwargs):
        raise raised

    monkeypatch.setattr(prep.verify, "verify_cache", disagreeing)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "internal error: the LoRA weights differ between processes" in line
    assert "This is a bug, not your data or config; please report it with" in line


@pytest.mark.parametrize("cli", [app, train_app], ids=["prep build-cache", "train run"])
def test_a_command_leaves_the_process_group_it_ran_in_even_when_it_fails(cli, tmp_path):
    """Under torchrun, a process that exits with its gloo group alive can abort at shutdown (SIGABRT), and
    torchrun then reports a run whose work succeeded as failed: both commands leave the group, however they end."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        command = ["build-cache"] if cli is app else ["run"]
        result = CliRunner().invoke(cli, [*command, "--config", str(tmp_path / "missing.json")])
        assert result.exit_code == 1 and "missing.json" in result.output
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
