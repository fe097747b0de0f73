"""Previews and the held-out loss during training, on the eval split, with every rank taking its share.

When (steps counted in optimizer steps):
- previews every `validation_step_interval` steps and at the end, plus once at step 0 with the LoRA
  switched off (the baseline; not with `disable_benchmark`), and again with the EMA weights when
  `use_ema` is on;
- the held-out loss every `eval_steps_interval` steps (default: `validation_step_interval`) and at the end.

Where: `<output_dir>/previews/step-NNNNNN[-base|-ema].png` (the grid), one PNG per eval sample in
`<output_dir>/previews/step-NNNNNN[-base|-ema]/`, the grid also in TensorBoard; the held-out loss in
`eval_log.csv`, TensorBoard and `loss.png`.

Eval sample i is handled by rank i mod world_size; rank 0 gathers the rows and writes. Every rank
enters every gather, also when its own part failed (it sends the error instead), so no rank waits
forever: a failed preview is reported and training goes on.
"""

from __future__ import annotations

import gc
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from shared.config import TrainConfig
from shared.models import load_vae_decoder
from shared.preview_grid import sample_row, save_png, step_grid
from train.batch import Batch
from train.eval_data import EvalSet
from train.objective import SigmaSchedule, velocity_errors
from train.previews import Decoder, sample_latents

log = logging.getLogger(__name__)
PREVIEWS = "previews"


class Validator:
    """Renders previews and measures the held-out loss of this rank's share of the eval split."""

    def __init__(
        self,
        cfg: TrainConfig,
        eval_set: EvalSet,
        accelerator,
        output_dir: Path,
        schedule: SigmaSchedule,
        tiled_decode: bool = False,
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.cfg, self.eval_set, self.accelerator, self.schedule = cfg, eval_set, accelerator, schedule
        self.output_dir = Path(output_dir)
        self.preview_every = cfg.validation_step_interval
        self.loss_every = cfg.eval_steps_interval or cfg.validation_step_interval
        self.previews_on = len(eval_set) > 0 and not cfg.validation_disable and cfg.validation_num_images > 0
        self.mine = eval_set.share(accelerator.process_index, accelerator.num_processes, cfg.validation_num_images)
        self.loss_mine = eval_set.share(accelerator.process_index, accelerator.num_processes)
        self.decoder: Decoder | None = None
        self.scheduler = None
        if self.previews_on:
            model = cfg.pretrained_model_name_or_path
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
            vae = load_vae_decoder(model, accelerator.device)
            self.decoder = Decoder(vae, accelerator.device, tiled=tiled_decode)
        self._truth: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}  # decoded once: (references, target)
        if not len(eval_set):
            log.info(
                "no eval samples: previews and the held-out loss are off (name an eval_dataset_id, or let prep hold "
                "samples out with eval_holdout, then rebuild the cache)"
            )

    def previews_due(self, step: int, last: bool) -> bool:
        return self.previews_on and (last or (self.preview_every > 0 and step % self.preview_every == 0))

    def loss_due(self, step: int, last: bool) -> bool:
        return len(self.eval_set) > 0 and (last or (self.loss_every > 0 and step % self.loss_every == 0))

    # --- previews ---------------------------------------------------------------------------------------

    def previews(self, transformer: torch.nn.Module, step: int, tag: str = "") -> np.ndarray | None:
        """Render this rank's eval samples, gather them on rank 0 and write the PNGs; return the grid [H, W, 3]
        uint8 (on rank 0, when every rank succeeded; else None)."""
        name = f"step-{step:06d}" + (f"-{tag}" if tag else "")
        rows, error = [], ""
        try:
            with evaluating(transformer):
                for index in self.mine:
                    sample = self.eval_set.load(index)
                    latents = sample_latents(
                        transformer,
                        self.scheduler,
                        sample,
                        self.cfg.validation_num_inference_steps,
                        self.cfg.validation_guidance,
                        self.cfg.validation_seed + index,
                        self.accelerator.device,
                    )
                    references, truth = self._ground_truth(index, sample)
                    row = sample_row(references, self.decoder(latents), truth, f"{sample.label}: {sample.instruction}")
                    rows.append((index, sample.label, row))
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: every rank still meets the gather
            error = f"rank {self.accelerator.process_index}: {err}"
        finally:
            release_memory()
        gathered = self._gather((rows, error))
        if not self.accelerator.is_main_process:
            return None
        errors = [e for _, e in gathered if e]
        if errors:
            log.warning("previews %s failed (%s); training goes on", name, errors[0].splitlines()[0])
            return None
        ordered = sorted((r for part, _ in gathered for r in part), key=lambda r: r[0])
        folder = self.output_dir / PREVIEWS / name
        for index, label, row in ordered:
            save_png(row, folder / f"{index:02d}-{_safe(label)}.png")
        title = f"step {step}" + {"base": " (base model, LoRA off)", "ema": " (EMA weights)"}.get(tag, "")
        grid = step_grid([row for _, _, row in ordered], title)
        path = self.output_dir / PREVIEWS / f"{name}.png"
        save_png(grid, path)
        log.info("previews: %s", path)
        return grid

    def _ground_truth(self, index: int, sample) -> tuple[list[np.ndarray], np.ndarray]:
        """The sample's references and target as images, decoded from their cached latents once."""
        if index not in self._truth:
            references = [self.decoder(r) for r in sample.references]
            self._truth[index] = (references, self.decoder(sample.target))
        return self._truth[index]

    # --- held-out loss ------------------------------------------------------------------------------------

    @torch.no_grad()
    def heldout_loss(self, transformer: torch.nn.Module) -> float:
        """The flow-matching loss on the whole eval split at `eval_timesteps` fixed σ values (the quantiles of
        the training σ density) with fixed noise per sample: it moves only when the model does. NaN (and a
        warning) when it could not be measured on some rank; every rank still meets the others' reduce."""
        device = self.accelerator.device
        total = torch.zeros(3, dtype=torch.float64, device=device)  # [sum of losses, count, failed ranks]
        try:
            with evaluating(transformer):
                for index in self.loss_mine:
                    total[:2] += self._sample_loss(transformer, index)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory; reported, and training goes on
            log.warning(
                "held-out loss failed on rank %d: %s", self.accelerator.process_index, err, extra={"all_ranks": True}
            )
            total[2] = 1
        finally:
            release_memory()
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, "sum")
        if total[2] > 0:
            return float("nan")
        return float(total[0] / total[1].clamp_min(1))

    def _sample_loss(self, transformer: torch.nn.Module, index: int) -> torch.Tensor:
        """[sum of the weighted losses at every fixed σ, their count] for eval sample `index`."""
        device = self.accelerator.device
        sample = self.eval_set.load(index)
        batch = Batch(sample.target[None], [r[None] for r in sample.references], sample.prompt[None], None).to(device)
        c, h, w = sample.target.shape
        generator = torch.Generator("cpu").manual_seed(self.cfg.validation_seed + index)
        noise = torch.randn((1, (h // 2) * (w // 2), 4 * c), generator=generator).to(device)
        sigmas = self.schedule.quantiles(self.cfg.eval_timesteps, noise.shape[1]).to(device)
        losses = [
            self.schedule.loss_weight(s[None]) * velocity_errors(transformer, batch, s[None], noise) for s in sigmas
        ]
        return torch.stack(
            [torch.cat(losses).sum().double(), torch.tensor(len(losses), dtype=torch.float64, device=device)]
        )

    def _gather(self, item) -> list:
        if self.accelerator.num_processes == 1:
            return [item]
        return gather_object([item])


@contextmanager
def evaluating(transformer: torch.nn.Module):
    """Eval mode (no LoRA dropout) and no autograd, back to training mode afterwards."""
    transformer.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        transformer.train()


@contextmanager
def lora_disabled(params: dict[str, torch.nn.Parameter]):
    """The base model alone: every adapter's up-projection (`lora_B`) zero inside the block, so each adapter adds
    exactly 0 (the numbers of peft's `disable_adapters`). Unlike that switch, the model runs the same code as
    with the LoRA on, so its compiled inference graphs serve both (train/blocks.py)."""
    zeros = {name: torch.zeros_like(p) for name, p in params.items() if "lora_B" in name}
    with weights_swapped({name: params[name] for name in zeros}, zeros):
        yield


@contextmanager
def weights_swapped(params: dict[str, torch.nn.Parameter], replacement: dict[str, torch.Tensor]):
    """The trainable parameters hold `replacement` (e.g. the EMA) inside the block, their own values after."""
    kept = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(replacement[name].to(p.device, p.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(kept[name].to(p.device))


def release_memory() -> None:
    """Give the preview's activations back, so the next training step finds the memory it planned for."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:80]
