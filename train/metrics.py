"""What a run reports: a progress bar, a CSV of every step, TensorBoard, and a loss-curve PNG.

Only the main process writes. After a resume the CSV keeps the rows up to the checkpoint's
step and continues from there, so it always describes the run that produced the LoRA.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
from tqdm import tqdm

from shared.plot import plot_losses

COLUMNS = ["step", "epoch", "loss", "lr", "s_per_step", "samples_per_s", "peak_gib", "nonfinite", "skipped"]
CSV_FILE = "train_log.csv"
PLOT_FILE = "loss.png"


class TrainMetrics:
    def __init__(self, output_dir: Path, first_step: int, max_steps: int, report_to: str, enabled: bool):
        self.output_dir, self.enabled = Path(output_dir), enabled
        self.progress = tqdm(total=max_steps, initial=first_step, desc="train", disable=not enabled)
        self.last = time.perf_counter()
        self.tensorboard = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / CSV_FILE
        kept = []
        if first_step and path.is_file():  # resumed: keep the history up to the checkpoint
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= first_step]
        self._file = open(path, "w", newline="")  # noqa: SIM115 - open for the whole run
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._csv.writeheader()
        self._csv.writerows(kept)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=first_step + 1)

    def step(self, step: int, epoch: int, loss: float, lr: float, samples: int, nonfinite: int, skipped: int) -> None:
        """Report optimizer step `step` (1-based); `samples` = samples it consumed on all processes."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        row = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "s_per_step": seconds,
            "samples_per_s": samples / seconds,
            "peak_gib": peak,
            "nonfinite": nonfinite,
            "skipped": skipped,
        }
        if not self.enabled:
            return
        self._csv.writerow(row)
        self._file.flush()
        if self.tensorboard is not None:
            for key in ("loss", "lr", "s_per_step", "samples_per_s", "peak_gib"):
                self.tensorboard.add_scalar(f"train/{key}", row[key], step)
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "s/step": f"{seconds:.2f}"}
        postfix["samples/s"] = f"{row['samples_per_s']:.2f}"
        if peak:
            postfix["peak"] = f"{peak:.1f}GiB"
        self.progress.set_postfix(postfix, refresh=False)
        self.progress.update(1)

    def close(self) -> list[float]:
        """Finish the files and draw the loss curve; return every step's loss (NaN for skipped steps)."""
        self.progress.close()
        if not self.enabled:
            return []
        self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        with open(self.output_dir / CSV_FILE, newline="") as f:
            losses = [float(row["loss"]) for row in csv.DictReader(f)]
        plot_losses(losses, self.output_dir / PLOT_FILE)
        return losses
