"""Training on several processes (torchrun, gloo on CPU): a checkpoint resumes on another process count at the same
learning rate, and a SIGTERM stops the processes at one step. That the ranks end with one LoRA, with every memory
lever on, is tests/train/test_multinode.py's first run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.config import load_config
from tests.train.conftest import QUICK
from train.checkpoint import checkpoint_problem, list_checkpoints
from train.loop import train


def rates(run: Path) -> list[float]:
    """The learning rate after each logged step (train_log.csv: one row a step, across resumes)."""
    rows = (run / "train_log.csv").read_text().splitlines()
    if not rows:  # rewritten at a resume (up to its checkpoint's step): a moment without its header
        return []
    column = rows[0].split(",").index("lr")
    return [float(row.split(",")[column]) for row in rows[1:]]


def test_a_one_process_checkpoint_resumes_on_two_at_its_learning_rate_and_sigterm_stops_both_at_one_step(
    project, tmp_path
):
    """The schedule counts optimizer steps: a run checkpointed on 1 process and resumed on 2 continues at the rate
    of a run that never stopped (warm-up over 5 steps, so every step's rate until then differs). Then, as a
    scheduler preempts a node: SIGTERM to the launcher, which passes it to both processes; they agree on one step
    (through their CPU all-reduce), write one checkpoint there and end saying so."""
    out = tmp_path / "ddp"
    # QUICK: no previews or EMA (nothing here reads them; the rates are in train_log.csv)
    schedule = {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 5, **QUICK}
    train(load_config(project(out, max_train_steps=3, checkpointing_steps=3, **schedule)))
    config = project(
        out, max_train_steps=40, checkpointing_steps=0, logging_steps=1, resume_from_checkpoint="latest", **schedule
    )
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535"]
    command += ["-m", "train.cli", "run", "--config", str(config)]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and launcher.poll() is None:
        if len(rates(out)) >= 3 + 2:  # two steps past the resumed checkpoint
            break
        time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode != 0, output[-3000:]
    assert "resumed from" in output and "2 process(es)" in output, output[-3000:]

    resumed, stopped = list_checkpoints(out)
    step = int(stopped.name.split("-")[1])
    assert resumed.name == "checkpoint-000003" and 5 <= step < 40, output[-3000:]
    assert checkpoint_problem(stopped) is None
    assert f"stopped by SIGTERM at step {step}: {stopped} holds the work" in output, output[-3000:]
    assert {p.name for p in stopped.glob("rng-rank*")} == {"rng-rank00.safetensors", "rng-rank01.safetensors"}
    expected = [1e-3 * min(1.0, s / 5) for s in range(1, step + 1)]  # rates after steps 1..step
    assert rates(out) == pytest.approx(expected)
