"""A training run, built once from a config and driven step by step: the one path `train run`, the benches
and the tests all take.

`Run(config)` does every piece of setup, in order: accelerate, the output folder's claim, the caches
(training rows and the eval split), the model (loaded, quantised, placed and wrapped block by block as
the memory plan says, LoRA added), the optimizer and its schedule, the EMA, the registry of stateful
parts a checkpoint saves (resumed from, when asked), the metrics and the validator. Then:

- `step()`: one optimizer step (`train.step.optimizer_step`) and its bookkeeping (EMA, metrics);
- `validate(step)`: the held-out loss and previews due after `step` (at step 0: the base model);
- `save_checkpoint(step)`, `finish()` (the exported LoRA).

`train.loop.train` is the list of those calls.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from peft.utils import get_peft_model_state_dict

from shared.config import Config, TrainConfig
from shared.errors import InternalError, UserError
from shared.flavours import FLAVOURS
from shared.logs import setup_logging
from shared.models import load_scheduler_config
from train import export
from train.attention import attention_backends
from train.blocks import TRAINING_GRAPHS
from train.caches import open_caches
from train.checkpoint import checkpoint_run_id, list_checkpoints, load_checkpoint, save_checkpoint
from train.checkpoint_parts import LoraWeights, OptimizerState, Progress, RngState
from train.ema import LoraEMA
from train.evaluation.eval_set import EvalSet
from train.evaluation.validator import Validator, lora_disabled, weights_swapped
from train.loader import TrainLoader
from train.memory import EAGER_ONLY, MEMORY_KEYS, MemoryPlan
from train.metrics import StepRecord, TrainMetrics
from train.model import check_lora_targets, check_precision_available, load_lora_transformer
from train.objective import SigmaSchedule
from train.optim import apply_resumed_settings, build_optimizer, build_scheduler
from train.output_dir import RunClaim, changed_settings, claim_output_dir, training_settings
from train.rollout import ScheduledSampling
from train.step import StepResult, optimizer_step
from train.trackers import check_trackers_available, open_trackers

log = logging.getLogger(__name__)
SMALL_CARD_MODES = ("low", "minimal")


class Run:
    """Everything one training run holds, built once from `config` (see the module docstring)."""

    def __init__(self, config: Config):
        cfg = self.cfg = config.train
        self.config = config
        self.accelerator = accelerator = Accelerator(
            mixed_precision="bf16" if cfg.mixed_precision == "bf16" else "no",
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        )
        setup_logging(accelerator.process_index)
        set_seed(cfg.seed)
        self.output_dir = Path(cfg.output_dir)
        check_lora_targets(cfg)  # before anything loads: on an empty model built from the config
        check_precision_available(cfg)
        check_trackers_available(cfg.report_to)
        self.claim = claim_on_main(accelerator, self.output_dir, cfg)  # whose folder is this?

        # Data: this rank's share of every batch, in the order fixed by (seed, manifests); the eval split apart.
        train_readers, eval_readers = open_caches(config)
        self.loader = TrainLoader(
            train_readers,
            cfg.train_batch_size,
            cfg.seed,
            accelerator.process_index,
            accelerator.num_processes,
            workers=cfg.dataloader_num_workers,
            prefetch=cfg.dataloader_prefetch_factor,
            caption_dropout=cfg.caption_dropout_probability,
        )
        self.eval_set = EvalSet(eval_readers)
        steps_per_epoch = max(1, self.loader.batches_per_epoch // cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch

        # Model and optimisation: frozen (quantised) base placed as the memory plan says, fp32 LoRA,
        # fused AdamW, a schedule counted in optimizer steps, EMA.
        tokens = self.loader.largest_batch_tokens(cfg.train_batch_size)
        transformer, self.plan = load_lora_transformer(cfg, accelerator.device, tokens, config.explicit)
        report_memory_plan(self.plan, cfg, config.explicit, tokens)
        self.params = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
        self.lora_config = export.json_safe(transformer.peft_config["default"].to_dict())
        optimizer = build_optimizer(list(self.params.values()), cfg)
        self.scheduler = build_scheduler(optimizer, cfg, self.max_steps)
        self.transformer, self.optimizer = accelerator.prepare(transformer, optimizer)
        self.model = accelerator.unwrap_model(self.transformer)  # previews and exports use the bare model
        self.ema = None
        if cfg.use_ema:
            device = "cpu" if cfg.ema_device == "cpu" else accelerator.device
            self.ema = LoraEMA(self.params, cfg.ema_decay, device)
        self.schedule = SigmaSchedule.from_config(cfg, load_scheduler_config(cfg.pretrained_model_name_or_path))
        self.rollout = ScheduledSampling.from_config(cfg)
        if self.rollout is not None:
            log.info(self.rollout.describe())
        self.noise = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + accelerator.process_index)

        # Everything a checkpoint saves and restores, by name: a new part is one line here.
        self.progress = Progress()
        self.parts = {
            "lora": LoraWeights(self.params),
            "optimizer": OptimizerState(self.optimizer.optimizer),
            "scheduler": self.scheduler,
            "loader": self.loader,
            "counters": self.progress,
            "rng": RngState(self.noise),
        }
        if self.ema is not None:
            self.parts["ema"] = self.ema
        if self.claim.resume is not None:
            self._resume(self.claim.resume)
        log.info(
            "training %s LoRA parameters for %d steps (%d batches/epoch/process, %d process(es), %s); "
            "%d eval sample(s)",
            f"{sum(p.numel() for p in self.params.values()):,}",
            self.max_steps,
            self.loader.batches_per_epoch,
            accelerator.num_processes,
            accelerator.device,
            len(self.eval_set),
        )

        samples_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
        main = accelerator.is_main_process
        trackers = open_trackers(cfg, self.output_dir, self.progress.step) if main else None
        self.metrics = TrainMetrics(
            self.output_dir, self.progress.step, self.max_steps, main, samples_per_step, trackers
        )
        # The small-card modes decode previews in tiles: whole 1024² decodes take ~3.5 GiB (bench/RESULTS.md).
        tiled = self.plan.mode in SMALL_CARD_MODES
        self.validator = Validator(cfg, self.eval_set, accelerator, self.output_dir, self.schedule, tiled_decode=tiled)
        self.nonfinite = NonfiniteGuard(cfg.max_nonfinite_steps, self.output_dir)
        self.batches = iter(self.loader)
        self.transformer.train()

    def _resume(self, checkpoint: Path) -> None:
        state, missing = load_checkpoint(checkpoint, self.accelerator, self.parts)
        if state["step"] >= self.max_steps:
            raise UserError(
                f"{checkpoint} is at step {state['step']}, and this run trains {self.max_steps} steps: nothing is "
                "left to train. Raise max_train_steps (or num_train_epochs) to continue, or `train export` it"
            )
        if self.ema is not None and "ema" in missing:  # use_ema turned on for this resume: start the EMA here
            self.ema.load_state_dict(LoraWeights(self.params).state_dict())
        # The loaded optimizer and schedule hold the saved rate, betas, ...: the config's apply from here on.
        apply_resumed_settings(self.optimizer.optimizer, self.scheduler, self.cfg)
        log.info("resumed from %s at step %d (epoch %d)", checkpoint, self.progress.step, self.loader.epoch)
        changed = changed_settings(state.get("config"), self.cfg)  # refused ones stopped the run before loading
        if changed:
            log.info(
                "settings changed since that checkpoint, applied from step %d on: %s",
                self.progress.step,
                "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changed),
            )

    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far (resumed ones included)."""
        return self.progress.step

    def step(self) -> StepResult:
        """One optimizer step, the EMA update and the step's metrics (on the device: no host sync here)."""
        try:
            result = optimizer_step(
                self.accelerator,
                self.transformer,
                self.optimizer,
                self.scheduler,
                self.params,
                self.batches,
                self.schedule,
                self.noise,
                self.cfg,
                self.rollout,
                self.progress.step,
            )
        except torch._dynamo.exc.FailOnRecompileLimitHit as err:
            raise InternalError(
                f"the compiled training blocks needed more than the {TRAINING_GRAPHS} graphs planned for them "
                f"({str(err).splitlines()[0]}); set compile_blocks: false to train without compiling, and report it"
            ) from err
        self.progress.step += 1
        if self.ema is not None:
            self.ema.update(self.params, self.progress.step, result.skipped)
        record = StepRecord(self.progress.step, self.loader.epoch, self.scheduler.get_last_lr()[0], *result)
        self.metrics.record(record)
        return result

    def flush_metrics(self) -> None:
        """Read the recorded steps back to the host (the one sync), log them, stop on persistent NaN."""
        for logged_step, loss, skipped in self.metrics.flush(self.progress.nonfinite_total, self.loader.skipped):
            self.progress.nonfinite_total += self.nonfinite.check(logged_step, loss, skipped)

    def validation_due(self, step: int, last: bool) -> bool:
        return self.validator.previews_due(step, last) or self.validator.loss_due(step, last)

    def validate(self, step: int, last: bool = False, baseline: bool = False) -> None:
        """The held-out loss and the previews due after `step`; `baseline`: before training, the base model
        (LoRA off). Both run without autograd, through the blocks' inference graphs, never the training
        step's (train/blocks.py)."""
        validator, model, cfg = self.validator, self.model, self.cfg
        measured: dict[str, float] = {}  # eval_log.csv's columns for this step

        def preview(tag: str, column: str, **kwargs) -> None:
            rendered = validator.previews(model, step, tag, **kwargs)
            if rendered is not None:
                self.metrics.image(f"previews/{tag or 'lora'}", rendered.grid, step)
                measured[column] = rendered.pixel_error

        with self.accelerator.autocast(), attention_backends(cfg.prefer_cudnn_attention):
            if validator.loss_due(step, last or baseline):
                measured["heldout_loss"] = validator.heldout_loss(model)
                log.info("held-out loss at step %d: %.5f", step, measured["heldout_loss"])
            if validator.previews_due(step, last or baseline):
                if baseline:  # step 0: the base model (the LoRA adds exactly 0 yet, so this is also the LoRA's)
                    if not cfg.disable_benchmark:
                        with lora_disabled(self.params):
                            preview("base", "preview_error")
                else:
                    preview("", "preview_error", last=last)
                    if self.ema is not None:
                        with weights_swapped(self.params, self.ema.state_dict()):
                            preview("ema", "preview_error_ema")
        self.metrics.evaluation(step, measured)

    def checkpoint_due(self, step: int, last: bool) -> bool:
        every = self.cfg.checkpointing_steps
        return bool(every) and (step % every == 0 or last)

    def save_checkpoint(self, step: int) -> Path | None:
        """Checkpoint `step`; its directory, or None when the weights were not finite (nothing written)."""
        state = {"lora_config": self.lora_config, "flavour": self.cfg.model_flavour, "run_id": self.claim.run_id}
        state["config"] = training_settings(self.cfg)  # a resume says what changed since
        limit = self.cfg.checkpoints_total_limit
        return save_checkpoint(self.output_dir, step, self.accelerator, self.parts, state, limit)

    def last_checkpoint(self) -> Path | None:
        mine = [p for p in list_checkpoints(self.output_dir) if checkpoint_run_id(p) == self.claim.run_id]
        return mine[-1] if mine else None

    def resume_line(self, signal_name: str, step: int, checkpoint: Path | None) -> str:
        """What a stopped run says: where it stopped, what holds its work, and the command that continues it."""
        kept = checkpoint or self.last_checkpoint()
        where = f"{kept} holds the work" if kept else "no checkpoint holds the work yet"
        command = f"train run --config {self.config.config_path} --output-dir {self.output_dir}"
        for key in ("max_train_steps", "memory_mode", "pretrained_model_name_or_path"):  # command-line overrides
            if key in self.config.overridden:
                command += f" --{key.replace('_', '-')} {getattr(self.cfg, key)}"
        command += " --resume-from-checkpoint latest"
        launch = " (under the same `accelerate launch`)" if self.accelerator.num_processes > 1 else ""
        return f"stopped by {signal_name} at step {step}: {where}; continue with `{command}`{launch}"

    def finish(self) -> Path:
        """Close the metrics, check the ranks agree, export the LoRA (and its EMA); the diffusers LoRA's path."""
        losses = [x for x in self.metrics.close() if math.isfinite(x)]  # skipped steps logged NaN
        check_ranks_agree(self.accelerator, self.params)
        lora_path = self.output_dir / export.LORA_FILE
        if self.accelerator.is_main_process:
            try:
                lora_path = export_final(self.model, self.ema, self.lora_config, self.output_dir, self.cfg)
            except OSError as err:  # a full or read-only disk at the very end: the checkpoints still hold the LoRA
                kept = list_checkpoints(self.output_dir)
                raise UserError(
                    f"{self.output_dir}: cannot write the final LoRA ({err.strerror or err}). The last complete "
                    f"checkpoint is {kept[-1] if kept else 'none'}: free space, then `train export` it"
                ) from None
            self._log_summary(losses)
        self.accelerator.wait_for_everyone()
        return lora_path

    def _log_summary(self, losses: list[float]) -> None:
        n = min(5, len(losses))
        if n:
            log.info(
                "done: step %d; loss mean of the first %d finite steps %.4f, of the last %d %.4f; "
                "%d non-finite step(s) skipped, %d unreadable sample(s) replaced on this process",
                self.progress.step,
                n,
                sum(losses[:n]) / n,
                n,
                sum(losses[-n:]) / n,
                self.progress.nonfinite_total,
                self.loader.skipped,
            )


class NonfiniteGuard:
    """Counts steps skipped for a non-finite loss; stops the run when `limit` come in a row."""

    def __init__(self, limit: int, output_dir: Path):
        self.limit, self.output_dir, self.run = limit, output_dir, 0

    def check(self, step: int, loss: float, skipped: bool) -> int:
        """Account for step `step`; return 1 if it was skipped (else 0); raise after `limit` in a row."""
        if not skipped:
            self.run = 0
            return 0
        self.run += 1
        log.warning("warning: loss was %s at step %d; step skipped (the weights did not change)", loss, step)
        if self.run >= self.limit:
            kept = list_checkpoints(self.output_dir)
            raise UserError(
                f"loss was NaN/inf for {self.run} steps in a row after step {step - self.run}; stopping. Last good "
                f"checkpoint: {kept[-1] if kept else 'none'}. Lower learning_rate (or check the cache with "
                "`prep verify`), then resume with resume_from_checkpoint."
            )
        return 1


def claim_on_main(accelerator, output_dir: Path, cfg: TrainConfig) -> RunClaim:
    """`claim_output_dir` on the main process, its answer (or its error) on every process."""
    outcome = None
    if accelerator.is_main_process:
        try:
            outcome = ("ok", claim_output_dir(output_dir, cfg, cfg.lora_modules))
        except UserError as err:
            outcome = ("error", str(err))  # every rank raises it: none waits for a run that never starts
    kind, value = broadcast_object_list([outcome])[0]
    if kind == "error":
        raise UserError(value)
    return value


def report_memory_plan(plan: MemoryPlan, cfg: TrainConfig, explicit: set[str], tokens: int) -> None:
    """Say what the memory plan is, why, and which of the user's keys shaped it."""
    log.info("largest batch: %d tokens\n%s", tokens, plan.describe())
    if not plan.compile_blocks and cfg.base_model_precision in EAGER_ONLY and torch.cuda.is_available():
        log.info("  compile off: %s", EAGER_ONLY[cfg.base_model_precision])
    chosen = sorted(k for k in explicit if k in MEMORY_KEYS)
    if chosen:
        log.info("  set in your config (these win over memory_mode): %s", ", ".join(chosen))
    if "gradient_checkpointing" in explicit and cfg.gradient_checkpointing and cfg.memory_mode == "auto":
        log.info(
            "  note: gradient_checkpointing true checkpoints every block, as in SimpleTuner; remove it to let "
            "memory_mode auto checkpoint only as many blocks as memory needs (faster)"
        )


def check_ranks_agree(accelerator, params: dict[str, torch.nn.Parameter]) -> None:
    """Every process must end with the same LoRA (DDP keeps them in step); say so, or stop loudly."""
    if accelerator.num_processes == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in params.values()]).to(accelerator.device)
    gathered = accelerator.gather(sums[None]).cpu()  # [processes, n_params]
    if not (gathered == gathered[0]).all():
        raise InternalError("the LoRA weights differ between processes after training")
    log.info("LoRA weights identical on %d processes", accelerator.num_processes)


def export_final(transformer, ema, lora_config: dict, output_dir: Path, cfg: TrainConfig) -> Path:
    """The LoRA (and the EMA LoRA in `ema/`) in diffusers and ComfyUI formats; returns the diffusers file."""
    flavour = FLAVOURS[cfg.model_flavour]
    state = get_peft_model_state_dict(transformer)
    path = export.save(state, lora_config, "diffusers", output_dir, flavour)
    export.save(state, lora_config, "comfyui", output_dir, flavour)
    if ema is not None:
        ema_state = {name.replace(".default.", "."): t for name, t in ema.state_dict().items()}
        for fmt in export.FORMATS:
            export.save(ema_state, lora_config, fmt, output_dir / "ema", flavour)
    return path
