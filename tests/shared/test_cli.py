"""What the command lines print when something goes wrong: one line, never a traceback on the terminal."""

from __future__ import annotations

from typer.testing import CliRunner

import prep.verify
from prep.cli import app


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
