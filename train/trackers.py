"""Where a run's numbers and preview grids go besides its CSVs: TensorBoard, Weights & Biases, or both.

`report_to` means what it means in SimpleTuner: "none", "tensorboard", "wandb" or "all" (both).
TensorBoard writes `<output_dir>/tensorboard`. Weights & Biases is an optional extra (`pip install
'qwen-edit-trainer[wandb]'`); it logs to `tracker_project_name` / `tracker_run_name` and keeps its
files in `<output_dir>/wandb`. A resumed run continues the same W&B run: its id is kept in
`<output_dir>/wandb_run_id`. `WANDB_MODE=offline` (or `wandb offline`) keeps everything local.
Only the main process reports.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from shared.config import TrainConfig
from shared.errors import UserError

BACKENDS = {"none": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}
RUN_ID_FILE = "wandb_run_id"


def check_trackers_available(report_to: str) -> None:
    """Say before anything loads when `report_to` needs Weights & Biases and it is not installed."""
    if "wandb" not in BACKENDS[report_to]:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(
            f"report_to '{report_to}' needs Weights & Biases, which is not installed: pip install "
            "'qwen-edit-trainer[wandb]' (or pip install wandb), then `wandb login` or WANDB_MODE=offline; "
            "or use report_to tensorboard (the CSVs and loss.png are always written)"
        ) from None


class Trackers:
    """The trackers `report_to` names, opened for a run that starts (or resumes) after `first_step`."""

    def __init__(self, report_to: str, output_dir: Path, first_step: int, project: str, run_name: str, settings: dict):
        backends = BACKENDS[report_to]
        self.tensorboard = self.wandb = None
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"), purge_step=first_step + 1)
        if "wandb" in backends:
            import wandb

            id_file = output_dir / RUN_ID_FILE
            run_id = id_file.read_text().strip() if first_step and id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(
                project=project, name=run_name, id=run_id, resume="allow", dir=str(output_dir), config=settings
            )

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars named "group/name" after optimizer step `step`."""
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A [H, W, 3] uint8 preview grid."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, image, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def open_trackers(config: TrainConfig, output_dir: Path, first_step: int) -> Trackers | None:
    """The trackers `config.report_to` names (None for "none"), given the run's settings to record."""
    if config.report_to == "none":
        return None
    settings = {k: v for k, v in vars(config).items() if isinstance(v, (str, int, float, bool, list))}
    project, run = config.tracker_project_name, config.tracker_run_name
    return Trackers(config.report_to, output_dir, first_step, project, run, settings)
