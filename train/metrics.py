"""What a run reports: a progress bar, a CSV of every step, the held-out loss, the trackers (`train/trackers.py`:
TensorBoard, Weights & Biases), and `loss.png`.

Every optimizer step records its loss, gradient norm (before clipping) and skip flag as device
tensors: no host sync. Every `logging_steps` steps (and before a checkpoint, a preview or the end)
`flush` reads them back in one sync and writes a CSV row per step; s/step and samples/s are the
wall time of that interval divided over its steps. Only the main process writes files; every
process flushes (the skip flags are identical on all of them) so all see the same non-finite steps.
After a resume the CSVs keep the rows up to the checkpoint's step and continue from there, so they
always describe the run that produced the LoRA.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from drawing.loss_chart import plot_losses
from train.trackers import Trackers

COLUMNS = [
    "step",
    "epoch",
    "loss",
    "grad_norm",
    "lr",
    "s_per_step",
    "samples_per_s",
    "peak_gib",
    "nonfinite",
    "skipped",
]
CSV_FILE = "train_log.csv"
EVAL_CSV_FILE = "eval_log.csv"
# held-out flow-matching loss; previews' mean |output - ground truth| (pixels in [0, 1]; at step 0 the base model's)
EVAL_COLUMNS = ["step", "heldout_loss", "preview_error", "preview_error_ema"]
PLOT_FILE = "loss.png"


@dataclass
class StepRecord:
    """One optimizer step as the device left it (0-dim tensors) and the host knew it."""

    step: int
    epoch: int
    lr: float
    loss: torch.Tensor
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # 1.0 if the step was skipped for a non-finite loss or gradient


class TrainMetrics:
    def __init__(
        self,
        output_dir: Path,
        first_step: int,
        max_steps: int,
        enabled: bool,
        samples_per_step: int,
        trackers: Trackers | None = None,
    ):
        """`enabled`: this is the main process (the only one that writes); `trackers`: where else to report."""
        self.output_dir, self.enabled, self.samples_per_step = Path(output_dir), enabled, samples_per_step
        self.progress = tqdm(total=max_steps, initial=first_step, desc="train", disable=not enabled)
        self.pending: list[StepRecord] = []
        self.last = time.perf_counter()
        self.trackers = trackers
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._csv = _ContinuedCsv(self.output_dir / CSV_FILE, COLUMNS, first_step)
        self._eval = _ContinuedCsv(self.output_dir / EVAL_CSV_FILE, EVAL_COLUMNS, first_step)

    def record(self, record: StepRecord) -> None:
        """Keep step `record.step`'s values on the device until the next flush."""
        self.pending.append(record)

    def flush(self, nonfinite_total: int, skipped_samples: int) -> list[tuple[int, float, bool]]:
        """Write the pending steps (one host sync); return (step, loss, skipped) for each of them.

        `nonfinite_total`: steps skipped before the pending ones; `skipped_samples`: unreadable samples so far.
        """
        if not self.pending:
            return []
        last_lr = self.pending[-1].lr
        values = torch.stack([torch.stack([r.loss, r.grad_norm, r.skipped]).float() for r in self.pending]).cpu()
        now = time.perf_counter()
        seconds, self.last = (now - self.last) / len(self.pending), now
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        out, nonfinite = [], nonfinite_total  # steps skipped before these
        for record, (loss, grad_norm, skipped) in zip(self.pending, values.tolist(), strict=True):
            nonfinite += int(skipped)
            out.append((record.step, loss, bool(skipped)))
            if not self.enabled:
                continue
            row = {
                "step": record.step,
                "epoch": record.epoch,
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": record.lr,
                "s_per_step": seconds,
                "samples_per_s": self.samples_per_step / seconds,
                "peak_gib": peak,
                "nonfinite": nonfinite,
                "skipped": skipped_samples,
            }
            self._csv.write(row)
            if self.trackers is not None:
                keys = ("loss", "grad_norm", "lr", "s_per_step", "samples_per_s", "peak_gib")
                self.trackers.scalars({f"train/{k}": row[k] for k in keys if math.isfinite(row[k])}, record.step)
        self.pending = []
        if self.enabled:
            self._csv.flush()
            loss = out[-1][1]
            postfix = {"loss": f"{loss:.4f}", "lr": f"{last_lr:.2e}", "s/step": f"{seconds:.2f}"}
            postfix["samples/s"] = f"{self.samples_per_step / seconds:.2f}"
            if peak:
                postfix["peak"] = f"{peak:.1f}GiB"
            self.progress.set_postfix(postfix, refresh=False)
            self.progress.update(len(out))
        return out

    def evaluation(self, step: int, measured: dict[str, float]) -> None:
        """Log what was measured after step `step` (some of EVAL_COLUMNS; the others stay empty)."""
        if not self.enabled or not measured:
            return
        self._eval.write({"step": step, **measured})
        self._eval.flush()
        if self.trackers is not None:
            self.trackers.scalars({f"eval/{k}": v for k, v in measured.items() if math.isfinite(v)}, step)

    def image(self, tag: str, image, step: int) -> None:
        """A [H, W, 3] uint8 preview grid to the trackers (None: nothing was rendered)."""
        if self.enabled and self.trackers is not None and image is not None:
            self.trackers.image(tag, image, step)

    def close(self) -> list[float]:
        """Finish the files and draw `loss.png`; return every step's loss (NaN for skipped steps)."""
        self.progress.close()
        if not self.enabled:
            return []
        self._csv.close()
        self._eval.close()
        if self.trackers is not None:
            self.trackers.close()
        rows = _ContinuedCsv.read(self.output_dir / CSV_FILE)
        evaluated = _ContinuedCsv.read(self.output_dir / EVAL_CSV_FILE)
        losses = [float(r["loss"]) for r in rows]
        steps, lrs = [int(r["step"]) for r in rows], [float(r["lr"]) for r in rows]
        heldout, preview_error = _column(evaluated, "heldout_loss"), _column(evaluated, "preview_error")
        plot_losses(steps, losses, lrs, heldout, self.output_dir / PLOT_FILE, preview_error)
        return losses


def _column(rows: list[dict], name: str) -> list[tuple[int, float]]:
    """(step, value) for the rows where `name` was measured."""
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]


class _ContinuedCsv:
    """A CSV written row by row; opened after a resume, it keeps the rows up to the resumed step."""

    def __init__(self, path: Path, columns: list[str], first_step: int):
        kept = [r for r in self.read(path) if int(r["step"]) <= first_step] if first_step else []
        self._file = open(path, "w", newline="")  # noqa: SIM115 - open for the whole run
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="ignore")
        self._writer.writeheader()
        self._writer.writerows(kept)

    @staticmethod
    def read(path: Path) -> list[dict]:
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def write(self, row: dict) -> None:
        self._writer.writerow(row)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
