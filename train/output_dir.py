"""Who owns an `output_dir`: one run at a time, and nothing of another run is overwritten or pruned.

A run writes `<output_dir>/run.json` (its id, when it started, its LoRA shape) before it trains,
and every checkpoint it saves carries that id. A new run into a folder that holds another run's
files (its `run.json`, checkpoints, LoRA or log) is refused unless it resumes that run or the
user asks to overwrite (`overwrite_output_dir: true`, `train run --overwrite`); even then, the
old run's checkpoints are never pruned or resumed by the new run. Resuming checks that the
LoRA's rank, alpha and targets are the ones the checkpoint was trained with, and compares every
other training key with the config the checkpoint's run had: a change the resumed run cannot take
is refused with its reason (RESUME_REFUSED); every other change is applied and listed.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.config import LORA_TARGETS, TrainConfig
from shared.errors import UserError
from shared.files import write_json_atomic
from train.checkpoint import checkpoint_run_id, list_checkpoints, resolve_resume
from train.export import LORA_FILE
from train.metrics import CSV_FILE

RUN_JSON = "run.json"

# Keys a resumed run cannot change, and why: what the checkpoint saved depends on them.
RESUME_REFUSED = {
    "optimizer": "the saved optimizer state belongs to the optimizer it was trained with",
    "train_batch_size": "the data order and the step count are counted in batches of the saved size",
    "gradient_accumulation_steps": "the data order and the step count are counted in batches of the saved size",
    "seed": "the saved random state (σ, noise, data order) continues, so a new seed would not be used",
    "model_flavour": "the LoRA was trained for the saved flavour",
}
# Not compared: where things are (a resumed run may find its model, data or folder elsewhere), how to start,
# and the LoRA's shape (check_same_lora).
NOT_COMPARED = (
    "output_dir",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "pretrained_model_name_or_path",
    "data_backend_config",
    "lora_rank",
    "lora_alpha",
    "lora_target",
)


def training_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The config's training keys as a checkpoint records them (JSON values)."""
    return json.loads(json.dumps(asdict(cfg), default=str))


def changed_settings(saved: dict[str, Any] | None, cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, value now) for each compared training key that differs from `saved` (a checkpoint's
    record of its run's config; None for checkpoints written before it was recorded: nothing to compare)."""
    if not isinstance(saved, dict):
        return []
    now = training_settings(cfg)
    return [(k, saved[k], now[k]) for k in now if k in saved and k not in NOT_COMPARED and saved[k] != now[k]]


@dataclass
class RunClaim:
    run_id: str
    resume: Path | None  # the checkpoint to continue from, if any


def lora_shape(cfg: TrainConfig, targets: list[str]) -> dict:
    """What a checkpoint's LoRA must match to be resumed: rank, alpha and target modules."""
    return {"r": cfg.lora_rank, "lora_alpha": float(cfg.lora_alpha or cfg.lora_rank), "target_modules": sorted(targets)}


def claim_output_dir(output_dir: Path, cfg: TrainConfig, targets: list[str]) -> RunClaim:
    """Decide (on the main process, before any model loads) which run `output_dir` now belongs to."""
    check_writable(output_dir)
    previous = _read_run(output_dir)
    resume = resolve_resume(output_dir, cfg.resume_from_checkpoint, previous.get("run_id"))
    shape = lora_shape(cfg, targets)
    if resume is not None:
        check_same_lora(resume, shape)
        check_resumable_settings(resume, cfg)
        run_id = checkpoint_run_id(resume) or previous.get("run_id") or uuid.uuid4().hex
        if previous.get("run_id") != run_id:
            _write_run(output_dir, run_id, shape)
        return RunClaim(run_id, resume)
    others = [p.name for p in (output_dir / RUN_JSON, output_dir / LORA_FILE, output_dir / CSV_FILE) if p.exists()]
    others += [p.name for p in list_checkpoints(output_dir)][-1:]
    if others and not cfg.overwrite_output_dir:
        started = f" (started {previous['started']})" if previous.get("started") else ""
        raise UserError(
            f"{output_dir} holds another training run{started}: {', '.join(others)}. Continue it with "
            'resume_from_checkpoint: "latest" (or --resume-from-checkpoint latest), start a new run there with '
            "overwrite_output_dir: true (or --overwrite; its checkpoints are kept, never resumed or pruned by the "
            "new run), or choose another output_dir"
        )
    run_id = uuid.uuid4().hex
    _write_run(output_dir, run_id, shape)
    return RunClaim(run_id, None)


def check_writable(output_dir: Path) -> None:
    probe = output_dir / f".write-test-{uuid.uuid4().hex[:8]}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output_dir {output_dir} cannot be written ({err.strerror}); choose a writable one") from None


def check_same_lora(checkpoint: Path, shape: dict) -> None:
    """Refuse to resume `checkpoint` with another rank, alpha or target list, saying what differs."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state.get("lora_config", {})
    before = {
        "r": saved.get("r"),
        "lora_alpha": float(saved["lora_alpha"]) if "lora_alpha" in saved else None,
        "target_modules": sorted(saved.get("target_modules") or []),
    }
    names = {"r": "lora_rank", "lora_alpha": "lora_alpha", "target_modules": "lora_target"}
    differ = [f"{names[k]} {before[k]} -> {shape[k]}" for k in shape if before[k] is not None and before[k] != shape[k]]
    if differ:
        targets_differ = before["target_modules"] and before["target_modules"] != shape["target_modules"]
        presets = [name for name, modules in LORA_TARGETS.items() if sorted(modules) == before["target_modules"]]
        presets = presets if targets_differ else []
        hint = f" (lora_target: {presets[0]})" if presets else ""
        if presets == ["attention"]:
            hint = " (lora_target: attention; runs begun before the default became attention_image, SimpleTuner's)"
        raise UserError(
            f"{checkpoint} was trained with another LoRA ({'; '.join(differ)}); resume with the checkpoint's "
            f"settings{hint}, or start a new run in another output_dir"
        )


def check_resumable_settings(checkpoint: Path, cfg: TrainConfig) -> None:
    """Refuse to resume `checkpoint` with a changed key the resumed run cannot take, naming each and why."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("config")
    refused = [(k, old, new) for k, old, new in changed_settings(saved, cfg) if k in RESUME_REFUSED]
    if refused:
        lines = "; ".join(f"{k} {old!r} -> {new!r} ({RESUME_REFUSED[k]})" for k, old, new in refused)
        raise UserError(
            f"{checkpoint} cannot be resumed with these changes: {lines}. Resume with the checkpoint's values, "
            "or start a new run in another output_dir"
        )


def _read_run(output_dir: Path) -> dict:
    try:
        return json.loads((output_dir / RUN_JSON).read_text())
    except (OSError, ValueError):
        return {}


def _write_run(output_dir: Path, run_id: str, shape: dict) -> None:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(output_dir / RUN_JSON, {"run_id": run_id, "started": started, "lora": shape})
