"""A run never overwrites, prunes or resumes another run's files, and resumes only with the LoRA it was trained with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import train.run as run_module
from shared.config import load_config
from shared.errors import UserError
from tests.train.conftest import QUICK
from train.checkpoint import checkpoint_run_id, list_checkpoints
from train.export import LORA_FILE
from train.loop import train


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded although the run was refused")


@pytest.fixture(scope="module")
def project(project):
    """The shared factory, with every run of this module quick: no previews or EMA (QUICK) and one micro-batch a
    step. No test here reads previews, the EMA or how many micro-batches make a step: they are about the folder,
    its checkpoints and what a resume accepts, and every run in a test (and the module's `trained`) uses these."""

    def make(out: Path, **overrides) -> Path:
        return project(out, **{**QUICK, "gradient_accumulation_steps": 1, **overrides})

    return make


@pytest.fixture(scope="module")
def trained(project, tmp_path_factory) -> Path:
    """A finished run of 4 steps, checkpointed at steps 2 and 4, trained once for the module (read through
    `run_copy`)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(project(out, max_train_steps=4, checkpointing_steps=2)))
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """This test's own copy of the trained run (tmp_path/run), to resume, damage or overwrite."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def test_a_new_run_into_a_folder_holding_another_run_is_refused_and_overwrite_keeps_the_old_checkpoints(
    project,
    run_copy,
    monkeypatch,
):
    out = run_copy  # 4 steps, checkpoints at 2 and 4
    old_lora = (out / LORA_FILE).read_bytes()
    old_run = json.loads((out / "run.json").read_text())["run_id"]

    with monkeypatch.context() as m:
        m.setattr(run_module, "load_lora_transformer", _no_model)
        with pytest.raises(UserError, match=r"holds another training run .*run\.json.*overwrite_output_dir: true"):
            train(load_config(project(out, max_train_steps=2, learning_rate=5e-4)))
    assert (out / LORA_FILE).read_bytes() == old_lora, "the refused run changed nothing"

    # Asked to overwrite: a new run, whose pruning and "latest" never touch the old run's checkpoints.
    train(
        load_config(
            project(out, max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=1, overwrite_output_dir=True)
        )
    )
    new_run = json.loads((out / "run.json").read_text())["run_id"]
    owners = {p.name: checkpoint_run_id(p) for p in list_checkpoints(out)}
    assert new_run != old_run
    assert owners == {"checkpoint-000002": new_run, "checkpoint-000004": old_run}, owners
    resumed = train(
        load_config(project(out, max_train_steps=3, checkpointing_steps=1, resume_from_checkpoint="latest"))
    )
    assert json.loads((out / "run.json").read_text())["run_id"] == new_run and resumed.exists()
    assert checkpoint_run_id(out / "checkpoints" / "checkpoint-000004") == old_run, "the old run's step 4 is intact"


@pytest.mark.parametrize(
    ("change", "says"),
    [({"lora_rank": 8}, "lora_rank 4 -> 8"), ({"lora_alpha": 16}, "lora_alpha 8.0 -> 16.0")],
)
def test_resuming_with_another_rank_or_alpha_is_refused_with_what_differs(
    project,
    run_copy,
    monkeypatch,
    change,
    says,
):
    out = run_copy  # lora_rank 4, lora_alpha 8; its latest checkpoint: step 4
    monkeypatch.setattr(run_module, "load_lora_transformer", _no_model)
    with pytest.raises(UserError, match=rf"checkpoint-000004 was trained with another LoRA \({says}\)"):
        train(load_config(project(out, max_train_steps=6, resume_from_checkpoint="latest", **change)))


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_model_loads(project, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(run_module, "load_lora_transformer", _no_model)
    with pytest.raises(UserError, match=r"output_dir .*a-file/run cannot be written"):
        config = load_config(project(tmp_path / "run", max_train_steps=1))
        config.train.output_dir = str(blocker / "run")  # a folder inside a file
        train(config)


def test_a_damaged_latest_checkpoint_is_skipped_saying_so_and_export_names_the_bad_file(
    project,
    run_copy,
    capsys,
):
    from typer.testing import CliRunner

    from train.cli import app

    out = run_copy  # 4 steps, checkpoints at 2 and 4
    damaged = out / "checkpoints" / "checkpoint-000004" / "lora.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # a write cut short

    capsys.readouterr()
    train(load_config(project(out, max_train_steps=5, checkpointing_steps=0, resume_from_checkpoint="latest")))
    printed = capsys.readouterr().out
    assert f"warning: {damaged} is damaged" in printed and "resuming from the checkpoint before it" in printed
    assert "resumed from " in printed and "checkpoint-000002 at step 2" in printed

    # `train export` in this process (the next test runs it as a process of its own: one more import of the
    # whole stack, 4 s of CPU): its exit code and its one line on stderr, no traceback
    result = CliRunner().invoke(app, ["export", str(damaged.parent)])
    assert result.exit_code == 1 and "Traceback" not in result.stderr and result.exception.__class__ is SystemExit
    assert f"{damaged} is damaged" in result.stderr


def test_a_flipped_byte_or_a_senseless_state_makes_a_checkpoint_damaged_for_resume_and_export(
    project,
    run_copy,
    caplog,
):
    """Every file's sha256 is recorded when the checkpoint is written: one flipped byte (the size unchanged, the
    safetensors header intact) is caught; so is a state no run can have (a negative step)."""
    import subprocess
    import sys

    from train.checkpoint import resolve_resume

    out = run_copy  # 4 steps, checkpoints at 2 and 4
    first, last = list_checkpoints(out)
    state = json.loads((last / "trainer_state.json").read_text())
    assert set(state["files"]) == {p.name for p in last.iterdir() if p.name != "trainer_state.json"}
    run_id = state["run_id"]

    lora = last / "lora.safetensors"
    original = lora.read_bytes()
    flipped = bytearray(original)
    flipped[-5] ^= 0x01  # inside the last tensor's data: a weight changes, nothing else does
    lora.write_bytes(bytes(flipped))
    assert resolve_resume(out, "latest", run_id) == first
    assert f"{lora} is damaged" in caplog.text and "sha256" in caplog.text
    with pytest.raises(UserError, match="is damaged"):
        resolve_resume(out, str(last), run_id)
    command = [sys.executable, "-m", "train.cli", "export", str(last)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr and f"{lora} is damaged" in result.stderr

    lora.write_bytes(original)
    assert resolve_resume(out, "latest", run_id) == last
    (last / "trainer_state.json").write_text(json.dumps(dict(state, step=-5)))
    caplog.clear()
    assert resolve_resume(out, "latest", run_id) == first
    assert "step -5 is not a step count" in caplog.text
    parts = dict(state["parts"], scheduler=dict(state["parts"]["scheduler"], last_epoch=9))
    (last / "trainer_state.json").write_text(json.dumps(dict(state, parts=parts)))
    caplog.clear()
    assert resolve_resume(out, "latest", run_id) == first
    assert "its learning-rate schedule is at step 9, its step is 4" in caplog.text
    parts = dict(state["parts"], loader=dict(state["parts"]["loader"], position=1))
    (last / "trainer_state.json").write_text(json.dumps(dict(state, parts=parts)))
    assert resolve_resume(out, "latest", run_id) == first

    (last / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="is at step 4, and this run trains 3 steps: nothing is left to train"):
        train(load_config(project(out, max_train_steps=3, checkpointing_steps=2, resume_from_checkpoint="latest")))


def test_resume_applies_and_lists_a_changed_rate_and_refuses_a_changed_batch_size(
    project,
    tmp_path,
    caplog,
):
    import csv
    import logging

    out = tmp_path / "run"
    base = {"lr_scheduler": "constant", "logging_steps": 1, "checkpointing_steps": 2}
    train(load_config(project(out, max_train_steps=2, learning_rate=1e-4, **base)))
    with pytest.raises(UserError, match=r"train_batch_size 2 -> 1 \(the data order"):
        train(load_config(project(out, max_train_steps=3, train_batch_size=1, resume_from_checkpoint="latest", **base)))

    caplog.set_level(logging.INFO)
    resumed = project(out, max_train_steps=3, learning_rate=5e-4, resume_from_checkpoint="latest", **base)
    train(load_config(resumed))
    listed = "settings changed since that checkpoint, applied from step 2 on: learning_rate 0.0001 -> 0.0005"
    assert listed in caplog.text
    from safetensors import safe_open

    def optimizer_keys(step: int) -> set[str]:
        with safe_open(out / "checkpoints" / f"checkpoint-{step:06d}" / "optimizer.safetensors", "pt") as f:
            return set(f.keys())

    assert optimizer_keys(3) == optimizer_keys(2)  # a resumed optimizer saves what it loaded, nothing more
    with open(out / "train_log.csv") as f:
        rates = {int(row["step"]): float(row["lr"]) for row in csv.DictReader(f)}
    assert rates[2] == pytest.approx(1e-4) and rates[3] == pytest.approx(5e-4)  # the new rate, not the saved one


def test_weights_that_went_nan_are_never_saved_and_the_stop_names_a_finite_checkpoint(
    project,
    tmp_path,
    monkeypatch,
):
    import torch

    real = run_module.optimizer_step
    calls = []

    def poisoning(accelerator, transformer, optimizer, scheduler, params, *args, **kwargs):
        result = real(accelerator, transformer, optimizer, scheduler, params, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second update leaves a LoRA weight at NaN
            with torch.no_grad():
                next(iter(params.values())).fill_(float("nan"))
        return result

    monkeypatch.setattr(run_module, "optimizer_step", poisoning)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"Last good checkpoint: .*checkpoint-000001\."):
        train(load_config(project(out, max_train_steps=6, checkpointing_steps=1, max_nonfinite_steps=2)))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000001"]


def test_a_full_disk_while_checkpointing_stops_with_the_last_complete_checkpoint(
    project,
    tmp_path,
    monkeypatch,
):
    import errno

    import train.checkpoint as checkpoint_module

    real, saves = checkpoint_module._save, []

    def filling(tensors, path):
        saves.append(path)
        if "checkpoint-000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint_module, "_save", filling)
    out = tmp_path / "run"
    with pytest.raises(
        UserError, match=r"cannot write the checkpoint \(No space left on device\)\. The last complete "
    ):
        train(load_config(project(out, max_train_steps=4, checkpointing_steps=1)))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000001"]
    assert not list((out / "checkpoints").glob(".tmp-*")), "the half-written checkpoint is removed"


def test_training_on_a_cache_built_with_other_prep_settings_is_refused_with_the_command_that_fixes_it(
    demo_project, tmp_path, monkeypatch
):
    from prep.build import build_cache

    config_path = demo_project("edit-v1", n_samples=2)
    build_cache(load_config(config_path), device="cpu")
    backend_path = tmp_path / "multidatabackend.json"
    backend = json.loads(backend_path.read_text())
    backend[0]["resolution"] = 320  # prep would now encode other buckets
    backend_path.write_text(json.dumps(backend))
    monkeypatch.setattr(run_module, "load_lora_transformer", _no_model)
    with pytest.raises(UserError, match=r"built with other prep settings .*\(changed: datasets\); rebuild it with "):
        train(load_config(config_path))


def test_an_unknown_lora_target_module_is_refused_before_the_model_loads(project, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "load_lora_transformer", _no_model)
    with pytest.raises(UserError, match=r"lora_target names module\(s\) this transformer does not have: attn\.to_qq"):
        train(load_config(project(tmp_path / "run", max_train_steps=1, lora_target=["attn.to_q", "attn.to_qq"])))


def test_a_read_only_disk_at_the_final_export_names_the_checkpoint_to_export(project, tmp_path, monkeypatch):
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(run_module.export, "save", read_only)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"cannot write the final LoRA \(Read-only file system\)\. .*checkpoint-000002"):
        train(load_config(project(out, max_train_steps=2, checkpointing_steps=2)))


def test_a_run_begun_with_both_streams_adapted_is_told_which_lora_target_resumes_it(tmp_path):
    """Runs that left lora_target unset before it defaulted to SimpleTuner's attention_image trained attention."""
    from shared.config import LORA_TARGETS
    from train.output_dir import check_same_lora

    state = {"lora_config": {"r": 4, "lora_alpha": 4.0, "target_modules": LORA_TARGETS["attention"]}}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    shape = {"r": 4, "lora_alpha": 4.0, "target_modules": sorted(LORA_TARGETS["attention_image"])}
    with pytest.raises(UserError, match=r"settings \(lora_target: attention; runs begun before the default"):
        check_same_lora(tmp_path, shape)
