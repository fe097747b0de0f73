"""Training checkpoints: complete or absent, never pickle, resumable exactly.

```
<output_dir>/checkpoints/checkpoint-000500/
  lora.safetensors           trainable (LoRA) parameters, fp32, by parameter name
  ema.safetensors            their EMA (when use_ema)
  optimizer.safetensors      optimizer state tensors ("state.<param index>.<name>")
  rng-rank00.safetensors     each rank's RNG states (torch CPU, CUDA, the noise generator)
  trainer_state.json         step, loader position, scheduler, optimizer hyper-parameters,
                             NaN counts, the LoRA config (rank, alpha, targets) and flavour
```

A checkpoint is written under a temporary name and renamed when every file is on disk, so a
kill at any moment leaves the previous checkpoints intact and no half-written one that looks
complete. With several processes all write into the same directory (a filesystem every rank
sees); rank 0 renames it and prunes old ones past `checkpoints_total_limit`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shared.errors import UserError
from shared.files import fsync_dir, fsync_file

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d{6,})$")


@dataclass
class Resumable:
    """Everything a checkpoint saves and restores besides the step and counters."""

    params: dict[str, torch.nn.Parameter]  # the trainable (LoRA) parameters, by name
    optimizer: Any
    scheduler: Any
    ema: Any  # train.ema.LoraEMA or None
    loader: Any  # train.loader.TrainLoader
    generator: torch.Generator  # this rank's noise generator


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted saves are not listed)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name)[1]))


def checkpoint_run_id(path: Path) -> str | None:
    """The id of the run that wrote checkpoint `path` (None for checkpoints older than run ids)."""
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def resolve_resume(output_dir: Path, value: str, run_id: str | None = None) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names: "latest" (None when there is none yet) or a path.

    "latest" is the newest checkpoint of run `run_id` (the run `output_dir` belongs to), so the
    checkpoints of another run kept in the same folder are never resumed by accident.
    """
    if not value:
        return None
    if value == "latest":
        found = [p for p in list_checkpoints(output_dir) if checkpoint_run_id(p) in (run_id, None)]
        for path in reversed(found):  # the newest readable one: a damaged one is skipped, and said so
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            print(f"warning: {problem}; resuming from the checkpoint before it")
        if found:
            raise UserError(f"no readable checkpoint in {Path(output_dir) / CHECKPOINTS}; start a new run")
        return None
    path = Path(value)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no trainer_state.json)")
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"resume_from_checkpoint: {problem}; resume from another checkpoint")
    return path


def checkpoint_problem(path: Path) -> str | None:
    """What is unreadable in checkpoint `path` (naming the file), or None when every file reads whole."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"{path / 'trainer_state.json'} is unreadable ({err})"
    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            return f"{file} is damaged ({problem})"
    if not (path / "lora.safetensors").is_file():
        return f"{path / 'lora.safetensors'} is missing"
    return None


def safetensors_problem(file: Path) -> str | None:
    """Why `file` is not a whole safetensors file (its header, and its size against the header), or None."""
    try:
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        expected = 8 + header_len + max(ends, default=0)
        size = file.stat().st_size
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"unreadable header: {err}"
    return None if size == expected else f"{size} bytes, its header says {expected}"


def save_checkpoint(
    output_dir: Path, step: int, accelerator, run: Resumable, state: dict[str, Any], total_limit: int
) -> Path | None:
    """Write checkpoint `step` (all ranks call this); return its directory, or None when the weights are not
    finite (such weights are never saved as a checkpoint to resume from)."""
    if not all(bool(torch.isfinite(p).all()) for p in run.params.values()):
        accelerator.print(f"warning: the LoRA weights hold NaN/inf at step {step}; checkpoint not written")
        return None
    root = Path(output_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    failure = ""
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            tmp.mkdir(parents=True)
    except OSError as err:
        failure = err.strerror or str(err)
    _agree(accelerator, failure, output_dir)

    try:
        _save(_rng_state(run.generator), tmp / f"rng-rank{accelerator.process_index:02d}.safetensors")
        if accelerator.is_main_process:
            _save({name: p.detach().float().cpu() for name, p in run.params.items()}, tmp / "lora.safetensors")
            if run.ema is not None:
                _save(run.ema.state_dict(), tmp / "ema.safetensors")
            tensors, optimizer_json = _flatten_optimizer(run.optimizer.state_dict())
            _save(tensors, tmp / "optimizer.safetensors")
            trainer_state = dict(
                state,
                step=step,
                loader=run.loader.state_dict(),
                scheduler=run.scheduler.state_dict(),
                optimizer=optimizer_json,
                world_size=accelerator.num_processes,
            )
            _write_json(tmp / "trainer_state.json", trainer_state)
    except OSError as err:  # a full or read-only disk: the previous checkpoints are untouched
        failure = err.strerror or str(err)
        shutil.rmtree(tmp, ignore_errors=True)
    _agree(accelerator, failure, output_dir)
    if accelerator.is_main_process:
        if final.exists():  # the same step saved before a crash and a resume from an earlier one
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        if total_limit > 0:  # only this run's own checkpoints are pruned
            mine = [p for p in list_checkpoints(output_dir) if checkpoint_run_id(p) == state.get("run_id")]
            for old in mine[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _agree(accelerator, failure: str, output_dir: Path) -> None:
    """Every rank learns whether any rank failed to write (so none waits for the others forever), then all
    stop with one clear message naming the last complete checkpoint."""
    failed = torch.tensor([1.0 if failure else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, "max")
    if failed.item():
        kept = list_checkpoints(output_dir)
        raise UserError(
            f"{output_dir}: cannot write the checkpoint ({failure or 'failed on another process'}). The last complete "
            f"checkpoint is {kept[-1] if kept else 'none'}; free space (or make the folder writable) and resume "
            "with resume_from_checkpoint: latest"
        )


def load_checkpoint(path: Path, accelerator, run: Resumable) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote into `run`; return the trainer state (step, counts, ...)."""
    params, ema = run.params, run.ema
    state = json.loads((path / "trainer_state.json").read_text())
    weights = load_file(str(path / "lora.safetensors"))
    missing = sorted(set(params) ^ set(weights))
    if missing:
        raise UserError(
            f"{path}: its LoRA does not match this run's ({len(missing)} parameter(s) differ, e.g. {missing[0]}); "
            "resume with the same lora_rank, lora_target and model, or start a new output_dir"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    run.optimizer.load_state_dict(
        _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    )
    run.scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        if (path / "ema.safetensors").is_file():
            ema.load_state_dict(load_file(str(path / "ema.safetensors")))
        else:
            ema.load_state_dict({name: p.detach() for name, p in params.items()})  # EMA turned on now: start here
    run.loader.load_state_dict(state["loader"])
    rng = path / f"rng-rank{accelerator.process_index:02d}.safetensors"
    if rng.is_file():
        _restore_rng(load_file(str(rng)), run.generator)
    else:
        accelerator.print(f"note: {path} has no RNG state for rank {accelerator.process_index}; noise will differ")
    return state


def read_lora(path: Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(peft adapter state dict, LoRA config, flavour) of a checkpoint, for `train export`."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path / 'trainer_state.json'} is unreadable ({err}); export another checkpoint") from None
    file = path / ("ema.safetensors" if ema else "lora.safetensors")
    if not file.is_file():
        raise UserError(f"{file}: not found" + (" (the run had use_ema off)" if ema else ""))
    problem = safetensors_problem(file)
    if problem:
        raise UserError(f"{file} is damaged ({problem}); export another checkpoint")
    # Parameter names carry peft's adapter name ("...lora_A.default.weight"); exports use none.
    weights = {name.replace(".default.", "."): t for name, t in load_file(str(file)).items()}
    return weights, state["lora_config"], state["flavour"]


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state(), "noise": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["noise"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> (tensors for safetensors, the rest as JSON)."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for name, value in rest["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    fsync_file(path)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))
    fsync_file(path)
