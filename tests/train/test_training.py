"""The full training loop on the tiny model, one process: resume, EMA, caption dropout, NaN, exports, logs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import QwenImageEditPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train.step as step_module
from shared.config import load_config
from shared.errors import UserError
from tests.cache_files import manifest_rows, sample_embeddings
from tests.train.conftest import LEVERS, QUICK
from train.checkpoint import list_checkpoints
from train.export import COMFYUI_FILE, LORA_FILE
from train.loader import CacheReader, TrainLoader
from train.loop import train

STRAIGHT_STEPS = 5  # not a checkpointing step (every 2): the last step is checkpointed all the same


@pytest.fixture(scope="module")
def project(project):
    """The shared factory, the held-out loss of every run here measured at 1 σ instead of 8: no test here reads
    its value (only when it was logged), and it changes no weight (fixed noise of its own, no gradient)."""

    def make(out: Path, **overrides) -> Path:
        return project(out, **{"eval_timesteps": 1, **overrides})

    return make


@pytest.fixture(scope="module")
def straight(project, tmp_path_factory) -> Path:
    """One run trained straight through, once for the module: its LoRA file. The tests that read a finished run
    (its checkpoints, logs, exports) read it, and the tests that stop and resume a run compare their LoRA with
    it; the checkpoint limit and TensorBoard it has change no weight, so those runs leave them out."""
    out = tmp_path_factory.mktemp("straight") / "run"
    settings = dict(checkpoints_total_limit=2, report_to="tensorboard", lora_rank=4, lora_alpha=8)
    return train(load_config(project(out, max_train_steps=STRAIGHT_STEPS, **settings)))


@pytest.fixture(scope="module")
def stopped(project, tmp_path_factory) -> Path:
    """The straight run's settings (less its checkpoint limit and TensorBoard) "stopped" after step 3 of its 5,
    once for the module: its folder, which the tests that resume it copy (a run resumes in its own folder)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(load_config(project(out, max_train_steps=3)))
    return out


@pytest.mark.parametrize("levers", [{}, LEVERS], ids=["plain", "swap-checkpoint-offload"])
def test_stop_and_resume_equals_training_straight_through(project, straight, tmp_path, levers, request):
    resumed_dir = tmp_path / "resumed"
    if levers:
        # without previews (the held-out loss and the EMA stay): the plain runs show that previews, the EMA's
        # among them, change no weight; this one is about the levers
        levers = dict(levers, validation_disable=True)
        train(load_config(project(resumed_dir, max_train_steps=3, **levers)))  # "stopped" after step 3
    else:  # the same run the module's `stopped` is
        shutil.copytree(request.getfixturevalue("stopped"), resumed_dir)
    assert [p.name for p in list_checkpoints(resumed_dir)] == ["checkpoint-000002", "checkpoint-000003"]
    resume = dict(levers, max_train_steps=STRAIGHT_STEPS, resume_from_checkpoint="latest")
    resumed = train(load_config(project(resumed_dir, **resume)))

    for a, b in [(straight, resumed), (straight.parent / "ema" / LORA_FILE, resumed.parent / "ema" / LORA_FILE)]:
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6)
    # the log describes the run that made the LoRA: steps 1..5 once each, resumed or not
    for run in (straight.parent, resumed.parent):
        lines = (run / "train_log.csv").read_text().splitlines()
        assert [int(line.split(",")[0]) for line in lines[1:]] == [1, 2, 3, 4, 5]


def test_sigterm_stops_after_the_step_with_a_checkpoint_there_and_the_resume_equals_a_straight_run(
    project, straight, tmp_path, monkeypatch
):
    """A scheduler's SIGTERM mid-run: the step finishes, a checkpoint is written at it (step 3: not a checkpoint
    step), the run ends with the line naming it and the resume command; resuming gives the straight run's LoRA
    (without previews or the EMA, QUICK: neither changes the LoRA's weights, and this test reads neither)."""
    import signal

    import train.run as run_module
    from shared.errors import Stopped
    from train.checkpoint import checkpoint_problem

    real = run_module.Run.step

    def stepping(self):
        result = real(self)
        if self.step_count == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the step's work, as a scheduler's would
        return result

    monkeypatch.setattr(run_module.Run, "step", stepping)
    stopped_dir = tmp_path / "stopped"
    with pytest.raises(Stopped) as stop:
        train(load_config(project(stopped_dir, max_train_steps=STRAIGHT_STEPS, **QUICK)))
    monkeypatch.undo()
    kept = stopped_dir / "checkpoints" / "checkpoint-000003"
    assert stop.value.exit_code == 143
    assert f"stopped by SIGTERM at step 3: {kept} holds the work" in str(stop.value)
    assert "--resume-from-checkpoint latest" in str(stop.value)
    assert checkpoint_problem(kept) is None

    resume = dict(QUICK, max_train_steps=STRAIGHT_STEPS, resume_from_checkpoint="latest")
    resumed = train(load_config(project(stopped_dir, **resume)))
    x, y = load_file(straight), load_file(resumed)
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6)


def test_a_signal_before_training_begins_stops_at_once_saying_nothing_was_saved(project, tmp_path, monkeypatch):
    import signal

    import train.run as run_module
    from shared.errors import Stopped

    def signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # during the step-0 previews: minutes before the first step

    monkeypatch.setattr(run_module.Run, "validate", signalled)
    with pytest.raises(Stopped, match="stopped by SIGTERM before training began; nothing to save") as stop:
        train(load_config(project(tmp_path / "early", max_train_steps=3)))
    assert stop.value.exit_code == 143 and not list_checkpoints(tmp_path / "early")


def test_report_to_all_logs_to_tensorboard_and_weights_and_biases_and_a_resume_continues_the_run(
    project, tmp_path, monkeypatch
):
    """SimpleTuner's `report_to: all` (here TensorBoard and Weights & Biases, offline): W&B gets every step's loss
    as the CSV has it, the held-out loss and the preview grids; a resumed run logs into the same W&B run."""
    pytest.importorskip("wandb")  # an optional extra; `make test` installs it
    from tests.train.wandb_records import history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    settings = dict(report_to="all", tracker_project_name="edits", validation_num_inference_steps=2, use_ema=False)
    # steps of one 1-sample micro-batch: what reaches the trackers, and when, is the same
    settings.update(gradient_accumulation_steps=1, train_batch_size=1)
    train(load_config(project(out, max_train_steps=2, **settings)))
    run_id = (out / "wandb_run_id").read_text().strip()
    train(load_config(project(out, max_train_steps=4, resume_from_checkpoint="latest", **settings)))
    assert (out / "wandb_run_id").read_text().strip() == run_id

    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # the first run and its resumption, under one id
    rows = [row for run in runs for row in history(run / f"run-{run_id}.wandb")]
    logged = {row["_step"]: row["train/loss"] for row in rows if "train/loss" in row}
    csv_rows = (out / "train_log.csv").read_text().splitlines()[1:]
    assert logged == {int(r.split(",")[0]): pytest.approx(float(r.split(",")[2])) for r in csv_rows}
    assert sorted(logged) == [1, 2, 3, 4]
    assert {row["_step"] for row in rows if "eval/heldout_loss" in row} == {0, 2, 4}
    previews = [row for row in rows if row.get("previews/lora/_type") == "image-file"]
    assert [row["_step"] for row in previews] == [2, 4]  # the end of each run
    assert any(row.get("previews/base/_type") == "image-file" and row["_step"] == 0 for row in rows)
    assert list(runs[0].glob("files/media/images/previews/lora_2_*.png"))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_report_to_wandb_without_wandb_says_what_to_install(project, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"needs Weights & Biases.*pip install 'qwen-edit-trainer\[wandb\]'"):
        train(load_config(project(tmp_path / "run", report_to="wandb")))


def test_checkpoints_are_complete_limited_and_exportable(straight, tmp_path):
    """The straight run: 5 steps, a checkpoint every 2 steps and at the last, the 2 newest kept."""
    from typer.testing import CliRunner

    from train.cli import app

    out, lora = straight.parent, straight
    checkpoints = list_checkpoints(out)
    assert [p.name for p in checkpoints] == ["checkpoint-000004", "checkpoint-000005"]
    final = checkpoints[-1]
    assert sorted(p.name for p in final.iterdir()) == [
        "ema.safetensors",
        "lora.safetensors",
        "optimizer.safetensors",
        "rng-rank00.safetensors",
        "trainer_state.json",
    ]
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["parts"]["loader"]["position"] == 10  # 2 micro-batches per step
    assert state["parts"]["counters"] == {"step": 5, "nonfinite_total": 0}

    # logs: a CSV row per step, a loss curve, TensorBoard events
    assert len((out / "train_log.csv").read_text().splitlines()) == 6
    assert Image.open(out / "loss.png").size == (1000, 750)  # the loss chart, and the previews' pixel error under it
    header = (out / "train_log.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "grad_norm", "lr", "samples_per_s"} <= set(header)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # `train export` of the last checkpoint equals the exports written at the end of training: the command
    # itself once (a process of its own), the same command in this process for the other formats
    for fmt, name in [("diffusers", LORA_FILE), ("comfyui", COMFYUI_FILE)]:
        for ema in (False, True):
            target = tmp_path / f"export-{fmt}-{ema}"
            args = ["export", str(final), "--format", fmt, "--out", str(target)] + (["--ema"] if ema else [])
            if (fmt, ema) == ("comfyui", True):
                result = subprocess.run([sys.executable, "-m", "train.cli", *args], capture_output=True, text=True)
                assert result.returncode == 0, result.stderr
            else:
                invoked = CliRunner().invoke(app, args)
                assert invoked.exit_code == 0, invoked.output
            ours, theirs = load_file(target / name), load_file((out / "ema" if ema else out) / name)
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert lora == out / LORA_FILE


def test_comfyui_export_has_comfyui_keys_and_the_same_weights_as_diffusers(straight, tiny_models):
    out = straight.parent  # lora_rank 4, lora_alpha 8
    comfy = load_file(out / COMFYUI_FILE)
    pipe = QwenImageEditPipeline.from_pretrained(str(tiny_models["edit-v1"]))
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    modules = {k.removeprefix("diffusion_model.").rsplit(".", 1)[0] for k in comfy if k.endswith(".alpha")}
    assert modules and all(k.startswith("diffusion_model.") for k in comfy)
    for module in modules:
        assert f"{module}.weight" in base  # names ComfyUI's Qwen-Image model uses (the diffusers layout)
        assert comfy[f"diffusion_model.{module}.alpha"].item() == 8.0
        assert comfy[f"diffusion_model.{module}.lora_down.weight"].shape[0] == 4

    # ComfyUI adds alpha/rank * up @ down to each weight: the same change diffusers makes when fusing
    pipe.load_lora_weights(out)
    pipe.fuse_lora()
    fused = pipe.transformer.state_dict()
    with safe_open(str(out / COMFYUI_FILE), "pt") as f:
        assert f.metadata()["format"] == "comfyui-lora"
    for module in modules:
        prefix = f"diffusion_model.{module}"
        delta = (8.0 / 4) * comfy[f"{prefix}.lora_up.weight"] @ comfy[f"{prefix}.lora_down.weight"]
        merged = fused[f"{module}.base_layer.weight"]  # peft keeps its wrapper around the fused weight
        torch.testing.assert_close(merged - base[f"{module}.weight"], delta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "settings",
    [
        {"lr_scheduler": "cosine", "lr_warmup_steps": 1, "flow_use_uniform_schedule": True, "loss_weighting": "cosmap"},
        {
            "lr_scheduler": "polynomial",
            "lr_warmup_steps": 0,
            "flow_schedule_auto_shift": True,
            "loss_weighting": "sigma_sqrt",
        },
        {"lora_target": ["to_q", "to_v"], "logit_mean": -0.5, "logit_std": 1.5},
        # SimpleTuner's names: its default optimizer, its linear and restarting schedules, its target list
        {"lr_scheduler": "linear", "lr_warmup_steps": 0, "optimizer": "adamw_bf16"},
        {"lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 0, "peft_lora_target_modules": '["to_k"]'},
    ],
)
def test_schedules_objectives_and_explicit_targets_train(project, tmp_path, settings):
    # 2 steps of 1 micro-batch of 1 sample: a first rate and a last; what is asserted (targets, rates, finite
    # weights) does not depend on the batches' size. No previews or EMA (QUICK): not read here.
    quick = dict(QUICK, max_train_steps=2, gradient_accumulation_steps=1, train_batch_size=1)
    lora = load_file(train(load_config(project(tmp_path / "run", **quick, **settings))))
    if isinstance(settings.get("lora_target"), list):
        assert {k.split(".")[-3] for k in lora} == {"to_q", "to_v"}
    if "peft_lora_target_modules" in settings:
        assert {k.split(".")[-3] for k in lora} == {"to_k"}
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    lrs = [float(r.split(",")[rows[0].split(",").index("lr")]) for r in rows[1:]]
    if settings.get("lr_scheduler") in ("linear", "cosine_with_restarts"):
        assert lrs[0] > 0 and lrs[-1] == 0  # decays to zero at the last step, as diffusers' schedules do
    assert all(torch.isfinite(v).all() for v in lora.values())


def test_bnb_optimizer_without_bitsandbytes_is_a_clear_error(project, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed (`make test` installs it)
    with pytest.raises(UserError, match="needs bitsandbytes"):
        train(load_config(project(tmp_path / "run", max_train_steps=1, optimizer="bnb-adamw8bit")))


def test_nonfinite_losses_are_skipped_counted_and_stop_when_persistent(project, tmp_path, monkeypatch, capsys):
    real = step_module.flow_matching_loss
    calls = {"n": 0}

    def loss_with_nans(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in poisoned else loss

    monkeypatch.setattr(step_module, "flow_matching_loss", loss_with_nans)
    poisoned = {3}  # one micro-batch of the second optimizer step
    # Micro-batches of 1 sample, no previews or EMA: the skip, its count and the stop do not depend on them.
    quick = dict(QUICK, train_batch_size=1)
    out = tmp_path / "skip"
    lora = train(load_config(project(out, max_train_steps=3, **quick)))
    assert "step 2; step skipped" in capsys.readouterr().out
    rows = (out / "train_log.csv").read_text().splitlines()
    nonfinite = rows[0].split(",").index("nonfinite")
    assert [row.split(",")[nonfinite] for row in rows[1:]] == ["0", "1", "1"]  # step 2 skipped, and counted
    assert all(torch.isfinite(t).all() for t in load_file(lora).values())

    # A skipped step leaves the weights exactly as they were (the fused AdamW skips on the device).
    calls["n"], poisoned = 0, set(range(5, 100))  # from the third step on, every loss is NaN
    out = tmp_path / "stop"
    with pytest.raises(UserError, match="NaN/inf for 3 steps in a row after step 2.*checkpoint-000004"):
        train(load_config(project(out, max_train_steps=8, max_nonfinite_steps=3, logging_steps=1, **quick)))
    first, second = list_checkpoints(out)
    assert [first.name, second.name] == ["checkpoint-000002", "checkpoint-000004"]
    a, b = load_file(first / "lora.safetensors"), load_file(second / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_caption_dropout_uses_the_cached_empty_instruction(project, tmp_path):
    config = load_config(project(tmp_path / "run"))
    cache = Path(config.cache_location_for(config.main_datasets()[0]))
    rows = {r["sample_id"]: r for r in manifest_rows(cache) if r["split"] == "train"}
    embeds = {i: sample_embeddings(cache, r) for i, r in rows.items()}
    assert all("dropout" in e for e in embeds.values())

    loader = TrainLoader([CacheReader(str(cache), dropout=True)], 1, seed=0, caption_dropout=0.5)
    batches = iter(loader)
    dropped = 0
    for _ in range(24):
        batch = next(batches)
        sample = embeds[batch.sample_ids[0]]
        if torch.equal(batch.prompt[0], sample["dropout"]):
            dropped += 1
        else:
            assert any(torch.equal(batch.prompt[0], v) for k, v in sample.items() if k.startswith("prompt."))
    assert 4 <= dropped <= 20


def test_a_checkpoint_of_the_previous_format_resumes_exactly(project, straight, stopped, tmp_path):
    """Checkpoints written before the registry of parts (format 1: parts listed by hand, the schedule counted in
    per-process steps) are converted when resumed, and continue exactly."""
    run = tmp_path / "old"
    shutil.copytree(stopped, run)  # 3 of the straight run's 5 steps
    checkpoint = list_checkpoints(run)[-1]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    parts = state.pop("parts")
    optimizer = parts["optimizer"]
    scalars = {f"{i}.{k}": v for i, values in optimizer["state"].items() for k, v in values.items() if v != "<tensor>"}
    old = dict(state, loader=parts["loader"], scheduler=parts["scheduler"], nonfinite_total=0)
    old["optimizer"] = {"param_groups": optimizer["param_groups"], "scalars": scalars}
    del old["format"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(old))

    resumed = train(load_config(project(run, max_train_steps=STRAIGHT_STEPS, resume_from_checkpoint="latest")))
    x, y = load_file(straight), load_file(resumed)
    assert all(torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-6) for k in x)
