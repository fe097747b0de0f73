"""Training on several processes (torchrun, gloo on CPU): a SIGTERM stops them at one step, and a checkpoint resumes
on another process count at the same learning rate. That the ranks end with one LoRA, with every memory lever on,
is tests/train/test_multinode.py's first run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import load_config
from tests.train.conftest import QUICK
from train.checkpoint import list_checkpoints
from train.loop import train


def test_sigterm_to_a_two_process_run_stops_both_at_one_step_with_a_checkpoint(project, tmp_path):
    """As a scheduler preempts a node: SIGTERM to the launcher, which passes it to both processes; they agree
    on one step (through their CPU all-reduce), write one checkpoint there and end saying so."""
    import signal
    import time

    from train.checkpoint import checkpoint_problem

    out = tmp_path / "ddp"
    # QUICK: no step-0 previews to wait through before the two steps (nothing here reads them)
    config = project(out, max_train_steps=40, checkpointing_steps=0, logging_steps=1, **QUICK)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535"]
    command += ["-m", "train.cli", "run", "--config", str(config)]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "train_log.csv"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and launcher.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:  # two steps logged
            break
        time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode != 0, output[-3000:]
    (checkpoint,) = list_checkpoints(out)
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < 40 and checkpoint_problem(checkpoint) is None, output[-3000:]
    assert f"stopped by SIGTERM at step {step}: {checkpoint} holds the work" in output, output[-3000:]
    assert {p.name for p in checkpoint.glob("rng-rank*")} == {"rng-rank00.safetensors", "rng-rank01.safetensors"}


def test_learning_rate_schedule_survives_a_change_of_process_count(project, tmp_path):
    """The schedule counts optimizer steps: a run checkpointed on 1 process and resumed on 2 continues at the
    same learning rate as a run that never stopped (warm-up over 5 steps, so every step's rate differs)."""
    schedule = {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 5, "checkpointing_steps": 3}
    schedule |= QUICK  # the three runs' previews and EMA: nothing here reads them (the rates are in train_log.csv)
    straight = train(load_config(project(tmp_path / "straight", max_train_steps=6, **schedule)))
    resumed = tmp_path / "resumed"
    train(load_config(project(resumed, max_train_steps=3, **schedule)))
    config = project(resumed, max_train_steps=6, resume_from_checkpoint="latest", **schedule)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    command += ["-m", "train.cli", "run", "--config", str(config)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and "2 process(es)" in result.stdout

    def rates(run: Path) -> list[float]:
        rows = (run / "train_log.csv").read_text().splitlines()
        column = rows[0].split(",").index("lr")
        return [float(row.split(",")[column]) for row in rows[1:]]

    expected = [1e-3 * min(1.0, step / 5) for step in range(1, 7)]  # rates after steps 1..6
    assert rates(straight.parent) == pytest.approx(expected)
    assert rates(resumed) == pytest.approx(expected)
