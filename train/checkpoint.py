"""Training checkpoints: complete or absent, never pickle, resumable exactly.

A checkpoint saves one registry of named stateful parts (`parts`: LoRA, optimizer, scheduler,
EMA, loader, RNG, step counters; each has `state_dict`/`load_state_dict`), so adding a part is
one line where the registry is built. Each part's tensors go to `<name>.safetensors` (by their
path in its state, e.g. `state.0.exp_avg`); the rest of its state goes to `trainer_state.json`.
Parts in `PER_RANK` (the RNG) are saved by every rank as `<name>-rankNN.safetensors`.

```
<output_dir>/checkpoints/checkpoint-000500/
  lora.safetensors           trainable (LoRA) parameters, fp32, by parameter name
  ema.safetensors            their EMA (when use_ema)
  optimizer.safetensors      optimizer state tensors ("state.<param index>.<name>")
  rng-rank00.safetensors     each rank's RNG states (torch CPU, CUDA, the noise generator)
  trainer_state.json         {"format": 2, "step", "world_size", "run_id", "flavour", "lora_config",
                              "parts": {name: the part's state without its tensors},
                              "files": {file name: sha256 hex of every other file, as written}}
```

Resume and `train export` check every file against its recorded sha256 and the state's values for
sense (step and counters) before using a checkpoint: a damaged one is skipped with a warning naming
the file (`latest`) or refused (a checkpoint named explicitly, an export). Checkpoints written before
`files` was recorded are checked by their safetensors headers and sizes only.

A checkpoint is written under a temporary name and renamed when every file is on disk, so a
kill at any moment leaves the previous checkpoints intact and no half-written one that looks
complete. With several processes all write into the same directory (a filesystem every rank
sees); rank 0 renames it and prunes old ones past `checkpoints_total_limit`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from shared.errors import UserError
from shared.files import fsync_dir, fsync_file

log = logging.getLogger(__name__)
FORMAT = 2  # 1: the parts listed by hand, scheduler counted in per-process steps
PER_RANK = ("rng",)
TENSOR = "<tensor>"  # marks where a tensor sat in a part's JSON state


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d{6,})$")


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
            log.warning("warning: %s; resuming from the checkpoint before it", problem)
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


def checkpoint_problem(path: Path, only: tuple[str, ...] = ()) -> str | None:
    """What is wrong in checkpoint `path` (naming the file), or None when its state makes sense and every
    file (or only the files in `only`) holds the bytes recorded when it was written."""
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        return f"{state_file} is unreadable ({err})"
    problem = state_problem(state)
    if problem:
        return f"{state_file} is damaged ({problem})"
    if not (path / "lora.safetensors").is_file():
        return f"{path / 'lora.safetensors'} is missing"
    recorded = state.get("files")
    if not isinstance(recorded, dict):  # written before checksums were recorded: headers and sizes only
        for file in sorted(path.glob("*.safetensors")):
            if not only or file.name in only:
                problem = safetensors_problem(file)
                if problem:
                    return f"{file} is damaged ({problem})"
        return None
    for name in sorted(recorded):
        if only and name not in only:
            continue
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file_sha256(file) != recorded[name]:
            return f"{file} is damaged (its bytes differ from those written: sha256 mismatch)"
    return None


def state_problem(state: Any) -> str | None:
    """Why a trainer state's values cannot be those of a real run (None when they can)."""
    if not isinstance(state, dict):
        return "not a JSON object"
    step, world = state.get("step"), state.get("world_size", 1)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"step {step!r} is not a step count"
    if not isinstance(world, int) or world < 1:
        return f"world_size {world!r} is not a process count"
    parts = state.get("parts") or {}
    counters, scheduler, loader = (parts.get(name) for name in ("counters", "scheduler", "loader"))
    if isinstance(counters, dict) and counters.get("step", step) != step:
        return f"its counters say step {counters.get('step')!r}, its step is {step}"
    if state.get("format", 1) >= 2 and isinstance(scheduler, dict) and scheduler.get("last_epoch", step) != step:
        return f"its learning-rate schedule is at step {scheduler.get('last_epoch')!r}, its step is {step}"
    accumulation = (state.get("config") or {}).get("gradient_accumulation_steps")
    if isinstance(loader, dict) and isinstance(accumulation, int):
        shift = loader.get("shift", 0)  # moved by resumes onto a changed plan (train/loader.py)
        if not isinstance(shift, int) or isinstance(shift, bool):
            return f"its data order's shift {shift!r} is not a batch count"
        needed = step * accumulation + shift
        if loader.get("position") != needed:
            return f"its data order is at batch {loader.get('position')!r}, step {step} needs {needed}"
    files = state.get("files")
    if files is not None and not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
        return "its file checksums are not a table of names and sha256s"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    output_dir: Path, step: int, accelerator, parts: dict[str, Stateful], state: dict[str, Any], total_limit: int
) -> Path | None:
    """Write checkpoint `step` of `parts` (all ranks call this); return its directory, or None when the LoRA
    weights are not finite (such weights are never saved as a checkpoint to resume from)."""
    lora = parts["lora"].state_dict()
    if not all(bool(torch.isfinite(t).all()) for t in lora.values()):
        log.warning("warning: the LoRA weights hold NaN/inf at step %d; checkpoint not written", step)
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

    written: dict[str, str] = {}  # file name -> sha256 of the bytes this rank wrote
    json_parts = {}
    try:
        for name in PER_RANK:
            if name in parts:
                file = f"{name}-rank{accelerator.process_index:02d}.safetensors"
                written[file] = _save(parts[name].state_dict(), tmp / file)
        if accelerator.is_main_process:
            for name, part in parts.items():
                if name in PER_RANK:
                    continue
                tensors, rest = split_tensors(lora if name == "lora" else part.state_dict())
                if tensors:
                    written[f"{name}.safetensors"] = _save(tensors, tmp / f"{name}.safetensors")
                if rest is not None:
                    json_parts[name] = rest
    except OSError as err:  # a full or read-only disk: the previous checkpoints are untouched
        failure = err.strerror or str(err)
    _agree(accelerator, failure, output_dir, tmp)
    files = {name: digest for table in gather_object([written]) for name, digest in table.items()}
    try:
        if accelerator.is_main_process:  # last: the state names every file with the sha256 it was written with
            trainer_state = dict(
                state, format=FORMAT, step=step, world_size=accelerator.num_processes, parts=json_parts, files=files
            )
            _write_json(tmp / "trainer_state.json", trainer_state)
    except OSError as err:
        failure = err.strerror or str(err)
    _agree(accelerator, failure, output_dir, tmp)
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


def split_tensors(state: Any, path: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """(every tensor in `state` by its dotted path, `state` with each tensor replaced by TENSOR).

    A state that is only tensors (a flat dict) leaves nothing for the JSON: its rest is None.
    """
    if isinstance(state, torch.Tensor):
        return {path: state.detach().cpu().contiguous()}, TENSOR
    if isinstance(state, dict):
        tensors, rest = {}, {}
        for key, value in state.items():
            found, rest[str(key)] = split_tensors(value, f"{path}.{key}" if path else str(key))
            tensors.update(found)
        only_tensors = rest and all(v == TENSOR for v in rest.values()) and not path
        return tensors, None if only_tensors else rest
    if isinstance(state, (list, tuple)):
        tensors, rest = {}, []
        for i, value in enumerate(state):
            found, kept = split_tensors(value, f"{path}.{i}" if path else str(i))
            tensors.update(found)
            rest.append(kept)
        return tensors, rest
    return {}, state


def join_tensors(rest: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """The inverse of `split_tensors` (dict keys come back as strings)."""
    if rest is None:  # at the top: a state that was only tensors; deeper: a None value (e.g. AdamW's foreach)
        return dict(tensors) if not path else None
    if rest == TENSOR:
        return tensors[path]
    if isinstance(rest, dict):
        return {k: join_tensors(v, tensors, f"{path}.{k}" if path else k) for k, v in rest.items()}
    if isinstance(rest, list):
        return [join_tensors(v, tensors, f"{path}.{i}" if path else str(i)) for i, v in enumerate(rest)]
    return rest


def _agree(accelerator, failure: str, output_dir: Path, tmp: Path | None = None) -> None:
    """Every rank learns whether any rank failed to write (so none waits for the others forever), then all
    stop with one clear message naming the last complete checkpoint (the unfinished one, `tmp`, removed)."""
    failed = torch.tensor([1.0 if failure else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, "max")
    if failed.item():
        if tmp is not None and accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(output_dir)
        raise UserError(
            f"{output_dir}: cannot write the checkpoint ({failure or 'failed on another process'}). The last complete "
            f"checkpoint is {kept[-1] if kept else 'none'}; free space (or make the folder writable) and resume "
            "with resume_from_checkpoint: latest"
        )


def load_checkpoint(path: Path, accelerator, parts: dict[str, Stateful]) -> tuple[dict[str, Any], list[str]]:
    """Restore every part `save_checkpoint` wrote into `parts`; return (the trainer state, the names of the
    parts this checkpoint does not hold: e.g. the EMA of a run that turns use_ema on only now)."""
    state = upgrade(json.loads((path / "trainer_state.json").read_text()), path)
    missing = []
    for name, part in parts.items():
        if name in PER_RANK:
            file = path / f"{name}-rank{accelerator.process_index:02d}.safetensors"
            if not file.is_file():
                log.warning(
                    "note: %s has no %s state for rank %d; it starts fresh",
                    path,
                    name,
                    accelerator.process_index,
                    extra={"all_ranks": True},
                )
                missing.append(name)
                continue
            part.load_state_dict(load_file(str(file)))
            continue
        file = path / f"{name}.safetensors"
        if name not in state["parts"] and not file.is_file():
            missing.append(name)
            continue
        tensors = load_file(str(file)) if file.is_file() else {}
        part.load_state_dict(join_tensors(state["parts"].get(name), tensors))
    return state, missing


def upgrade(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """A trainer state of checkpoint format 1 in today's form: its parts gathered under "parts", the
    optimizer's JSON rebuilt around its tensors' paths, and the scheduler counted in optimizer steps
    (format 1 stepped it once per process per step)."""
    if state.get("format", 1) >= 2:
        return state
    world = state.get("world_size", 1)
    scheduler = dict(state["scheduler"])
    for key in ("last_epoch", "_step_count"):
        if key in scheduler:
            scheduler[key] = scheduler[key] // world
    optimizer: dict[str, Any] = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    with open(path / "optimizer.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    for name in header:
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            optimizer["state"].setdefault(index, {})[key] = TENSOR
    for name, value in state["optimizer"]["scalars"].items():
        index, key = name.split(".", 1)
        optimizer["state"].setdefault(index, {})[key] = value
    parts = {"optimizer": optimizer, "scheduler": scheduler, "loader": state["loader"]}
    parts["counters"] = {"step": state["step"], "nonfinite_total": state.get("nonfinite_total", 0)}
    return dict(state, format=FORMAT, parts=parts)


def read_lora(path: Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(peft adapter state dict, LoRA config, flavour) of a checkpoint, for `train export`."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path / 'trainer_state.json'} is unreadable ({err}); export another checkpoint") from None
    file = path / ("ema.safetensors" if ema else "lora.safetensors")
    if not file.is_file():
        raise UserError(f"{file}: not found" + (" (the run had use_ema off)" if ema else ""))
    problem = checkpoint_problem(path, only=(file.name,))
    if problem:
        raise UserError(f"{problem}; export another checkpoint")
    # Parameter names carry peft's adapter name ("...lora_A.default.weight"); exports use none.
    weights = {name.replace(".default.", "."): t for name, t in load_file(str(file)).items()}
    return weights, state["lora_config"], state["flavour"]


def _save(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write `tensors` as a safetensors file (fsynced); return the sha256 (hex) of the bytes written."""
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()})
    path.write_bytes(data)
    fsync_file(path)
    return hashlib.sha256(data).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))
    fsync_file(path)
