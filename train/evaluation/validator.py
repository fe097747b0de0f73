"""Previews and the held-out loss during training, on the eval split, with every rank taking its share.

When (steps counted in optimizer steps):
- previews every `validation_step_interval` steps and at the end, plus once at step 0 with the LoRA
  switched off (the baseline; not with `disable_benchmark`), and again with the EMA weights when
  `use_ema` is on;
- the held-out loss every `eval_steps_interval` steps (default: `validation_step_interval`) and at the end.

Where: `<output_dir>/previews/step-NNNNNN[-base|-ema].png` (the grid), per eval sample in
`<output_dir>/previews/step-NNNNNN[-base|-ema]/`: `NN-<sample>.png` (references | output | ground truth),
and the output and ground truth alone at full size (`NN-<sample>.output.png`, `NN-<sample>.target.png`);
at the end `previews/before-after.png`: each eval sample's base-model output (step 0) beside the last
step's. The grids also go to TensorBoard; the held-out loss and the previews' pixel error (mean
|output − ground truth| over the eval samples, pixels in [0, 1]) to `eval_log.csv`, TensorBoard and
`loss.png`. The ground truth is the cached target latents decoded by the same VAE decoder, so the error
measures the edit, not the VAE.

Eval sample i is handled by rank i mod world_size; rank 0 gathers the rows and writes. Every rank
enters every gather, also when its own part failed (it sends the error instead), so no rank waits
forever: a failed preview is reported and training goes on.
"""

from __future__ import annotations

import gc
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from drawing.preview_grid import read_png, sample_row, save_png, step_grid
from shared.config import TrainConfig
from shared.models import load_vae_decoder
from train.batch import Batch
from train.evaluation.eval_set import EvalSet
from train.evaluation.sampling import Decoder, sample_latents
from train.objective import SigmaSchedule, velocity_errors

log = logging.getLogger(__name__)
PREVIEWS = "previews"
BEFORE_AFTER = "before-after.png"


def pixel_error(output: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute difference of two [H, W, 3] uint8 images, pixels scaled to [0, 1]."""
    return float(np.abs(output.astype(np.float32) - truth.astype(np.float32)).mean() / 255)


@dataclass
class SamplePanels:
    """One eval sample's preview: what its row shows, before it is drawn (rank 0 draws every rank's)."""

    index: int
    label: str
    caption: str
    references: list[np.ndarray]  # each [h, w, 3] uint8, decoded from the cached latents
    output: np.ndarray  # [H, W, 3] uint8: the edit sampled now
    truth: np.ndarray  # [H, W, 3] uint8: the cached target, decoded
    pixel_error: float  # of `output` against `truth`, measured once on the rank that rendered it

    @property
    def stem(self) -> str:
        """`NN-<dataset id>_<relative path without its extension>`: the sample's file names in a step's folder."""
        return f"{self.index:02d}-{_safe(self.label.rsplit('.', 1)[0])}"

    def reference_panels(self) -> list[tuple[str, np.ndarray]]:
        return [(f"reference {i + 1}", r) for i, r in enumerate(self.references)]


@dataclass
class Rendered:
    """One preview step on rank 0: its grid [H, W, 3] uint8 and the mean pixel error over the eval samples."""

    grid: np.ndarray
    pixel_error: float


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

    def previews(self, transformer: torch.nn.Module, step: int, tag: str = "", last: bool = False) -> Rendered | None:
        """Render this rank's eval samples, gather them on rank 0 and write the PNGs (with `last`, also the
        before/after grid); return the step's grid and pixel error (on rank 0, when every rank succeeded;
        else None)."""
        name = f"step-{step:06d}" + (f"-{tag}" if tag else "")
        panels, failure = [], ""
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
                    caption = f"{sample.label}: {sample.instruction}"
                    output = self.decoder(latents)
                    error = pixel_error(output, truth)
                    panels.append(SamplePanels(index, sample.label, caption, references, output, truth, error))
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: every rank still meets the gather
            failure = f"rank {self.accelerator.process_index}: {err}"
        finally:
            release_memory()
        gathered = self._gather((panels, failure))
        if not self.accelerator.is_main_process:
            return None
        errors = [e for _, e in gathered if e]
        if errors:
            log.warning("previews %s failed (%s); training goes on", name, errors[0].splitlines()[0])
            return None
        ordered = sorted((p for part, _ in gathered for p in part), key=lambda p: p.index)
        folder = self.output_dir / PREVIEWS / name
        rows = []
        for p in ordered:
            rows.append(sample_row([*p.reference_panels(), ("output", p.output), ("ground truth", p.truth)], p.caption))
            save_png(rows[-1], folder / f"{p.stem}.png")
            save_png(p.output, folder / f"{p.stem}.output.png")
            save_png(p.truth, folder / f"{p.stem}.target.png")
        title = f"step {step}" + {"base": " (base model, LoRA off)", "ema": " (EMA weights)"}.get(tag, "")
        grid = step_grid(rows, title)
        path = self.output_dir / PREVIEWS / f"{name}.png"
        save_png(grid, path)
        mean_error = float(np.mean([p.pixel_error for p in ordered]))
        log.info("previews: %s (pixel error %.4f)", path, mean_error)
        if last and not tag:
            self._before_after(ordered, step)
        return Rendered(grid, mean_error)

    def _before_after(self, finals: list[SamplePanels], step: int) -> None:
        """`previews/before-after.png`: per eval sample, its references, the base model's output (step 0, read
        back from its PNG, so a resumed run has it too), the output after `step` and the ground truth."""
        base_folder = self.output_dir / PREVIEWS / "step-000000-base"
        rows = []
        for p in finals:
            base = base_folder / f"{p.stem}.output.png"
            if not base.is_file():
                log.info("no base-model preview at %s (disable_benchmark?): no before/after grid", base)
                return
            before = read_png(base)
            panels = [*p.reference_panels(), ("step 0 (base)", before), (f"step {step}", p.output)]
            caption = f"{p.caption} | pixel error {pixel_error(before, p.truth):.3f} -> {p.pixel_error:.3f}"
            rows.append(sample_row([*panels, ("ground truth", p.truth)], caption))
        path = self.output_dir / PREVIEWS / BEFORE_AFTER
        save_png(step_grid(rows, f"before and after training: step 0 (base model) and step {step}"), path)
        log.info("before/after: %s", path)

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
    """The trainable parameters hold `replacement` (e.g. the EMA) inside the block, their own values after.

    Autocast keeps the bf16 copies it made of fp32 weights until its outermost context exits, so each swap
    drops them: without that, EMA previews inside the validation's autocast rendered the live weights."""
    kept = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(replacement[name].to(p.device, p.dtype))
        torch.clear_autocast_cache()
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(kept[name].to(p.device))
        torch.clear_autocast_cache()


def release_memory() -> None:
    """Give the preview's activations back, so the next training step finds the memory it planned for."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:80]
