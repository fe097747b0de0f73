"""`train run`: the LoRA training loop, run through accelerate (one GPU, several, several nodes, or CPU).

The loop, in order: read the caches (training rows and the eval split), build the model, the
optimizer and its schedule, register every stateful part, resume from a checkpoint if asked,
preview the base model (step 0), then repeat: the optimizer step (accumulated micro-batches; a
non-finite loss skips the update on every rank, on the device), the EMA update, the metrics (read
back every `logging_steps`), the held-out loss and previews when due, the periodic checkpoint; at
the end export the LoRA (and its EMA) in diffusers and ComfyUI formats.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from peft.utils import get_peft_model_state_dict

from shared.cache.fingerprint import PER_SAMPLE, TRAINING_INDEPENDENT, changed_settings, fingerprint
from shared.config import Config, DatasetConfig, TrainConfig
from shared.errors import InternalError, UserError
from shared.flavours import FLAVOURS
from shared.logs import setup_logging
from shared.models import load_scheduler_config
from train import export
from train.blocks import attention_backends
from train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from train.ema import LoraEMA
from train.eval_data import EvalSet
from train.loader import CacheReader, TrainLoader
from train.memory import MEMORY_KEYS, MemoryPlan
from train.metrics import StepRecord, TrainMetrics
from train.model import LORA_TARGETS, check_lora_targets, check_precision_available, load_lora_transformer
from train.objective import SigmaSchedule, flow_matching_loss
from train.optim import build_optimizer, build_scheduler, skips_on_device
from train.output_dir import RunClaim, claim_output_dir
from train.state import LoraWeights, OptimizerState, Progress, RngState
from train.trackers import check_trackers_available, open_trackers
from train.validation import Validator, lora_disabled, weights_swapped

log = logging.getLogger(__name__)
SMALL_CARD_MODES = ("low", "minimal")


def open_caches(config: Config) -> tuple[list[CacheReader], list[CacheReader]]:
    """(a reader of the training rows of each training dataset's cache, a reader of the eval rows of every
    main dataset's cache), refusing caches of another flavour or built with other prep settings."""
    train_readers, eval_readers = [], []
    for main in config.main_datasets():
        location = config.cache_location_for(main)
        if main.id != config.train.eval_dataset_id:
            train_readers.append(CacheReader(location, main.id, main.repeats, main.probability or None))
        eval_readers.append(CacheReader(location, main.id, split="eval"))
        check_cache(config, main, eval_readers[-1])
    return train_readers, eval_readers


def check_cache(config: Config, main: DatasetConfig, reader: CacheReader) -> None:
    """The cache must hold what this config's prep settings would encode (resolution, crops, model, template,
    ...): otherwise training would silently learn from other data."""
    if reader.info["flavour"] != config.train.model_flavour:
        raise UserError(
            f"{reader.location}: built for {reader.info['flavour']}, but model_flavour is "
            f"{config.train.model_flavour}; rebuild it with `prep build-cache`"
        )
    expected = fingerprint(config, main, dtype=None)["settings"]
    built = reader.info.get("fingerprint", {}).get("settings", {})
    changed = changed_settings(built, expected, ignore=TRAINING_INDEPENDENT)
    if changed and set(changed) <= set(PER_SAMPLE):
        raise UserError(
            f"{reader.location}: its eval samples were cached with other preview settings "
            "(validation_negative_prompt / validation_resolution); run "
            f"`prep build-cache --config {config.config_path}` (it re-encodes the eval samples only)"
        )
    if changed:
        raise UserError(
            f"{reader.location}: built with other prep settings than {config.config_path} gives (changed: "
            f"{', '.join(changed)}); rebuild it with `prep build-cache --config {config.config_path} --force`, "
            "or train with the config it was built with"
        )


def train(config: Config) -> Path:
    """Train a LoRA as `config` says; return the path of the diffusers LoRA file."""
    cfg = config.train
    accelerator = Accelerator(
        mixed_precision="bf16" if cfg.mixed_precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
    )
    setup_logging(accelerator.process_index)
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    check_lora_targets(cfg)  # before anything loads: on an empty model built from the config
    check_precision_available(cfg)
    check_trackers_available(cfg.report_to)
    claim = claim_on_main(accelerator, output_dir, cfg)  # whose folder is this?

    # Data: this rank's share of every batch, in the order fixed by (seed, manifests); the eval split apart.
    train_readers, eval_readers = open_caches(config)
    loader = TrainLoader(
        train_readers,
        cfg.train_batch_size,
        cfg.seed,
        accelerator.process_index,
        accelerator.num_processes,
        workers=cfg.dataloader_num_workers,
        prefetch=cfg.dataloader_prefetch_factor,
        caption_dropout=cfg.caption_dropout_probability,
    )
    eval_set = EvalSet(eval_readers)
    steps_per_epoch = max(1, loader.batches_per_epoch // cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch

    # Model and optimisation: frozen (quantised) base placed as the memory plan says, fp32 LoRA,
    # fused AdamW, a schedule counted in optimizer steps, EMA.
    tokens = loader.largest_batch_tokens(cfg.train_batch_size)
    transformer, plan = load_lora_transformer(cfg, accelerator.device, tokens, config.explicit)
    report_memory_plan(plan, cfg, config.explicit, tokens)
    params = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
    lora_config = export.json_safe(transformer.peft_config["default"].to_dict())
    optimizer = build_optimizer(list(params.values()), cfg)
    scheduler = build_scheduler(optimizer, cfg, max_steps)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    ema = None
    if cfg.use_ema:
        ema = LoraEMA(params, cfg.ema_decay, "cpu" if cfg.ema_device == "cpu" else accelerator.device)
    schedule = SigmaSchedule.from_config(cfg, load_scheduler_config(cfg.pretrained_model_name_or_path))
    noise = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + accelerator.process_index)

    # Everything a checkpoint saves and restores, by name: a new part is one line here.
    progress = Progress()
    parts = {
        "lora": LoraWeights(params),
        "optimizer": OptimizerState(optimizer.optimizer),
        "scheduler": scheduler,
        "loader": loader,
        "counters": progress,
        "rng": RngState(noise),
    }
    if ema is not None:
        parts["ema"] = ema
    if claim.resume is not None:
        _, missing = load_checkpoint(claim.resume, accelerator, parts)
        if ema is not None and "ema" in missing:  # use_ema turned on for this resume: start the EMA here
            ema.load_state_dict(LoraWeights(params).state_dict())
        log.info("resumed from %s at step %d (epoch %d)", claim.resume, progress.step, loader.epoch)
    log.info(
        "training %s LoRA parameters for %d steps (%d batches/epoch/process, %d process(es), %s); %d eval sample(s)",
        f"{sum(p.numel() for p in params.values()):,}",
        max_steps,
        loader.batches_per_epoch,
        accelerator.num_processes,
        accelerator.device,
        len(eval_set),
    )

    samples_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    trackers = open_trackers(cfg, output_dir, progress.step) if accelerator.is_main_process else None
    metrics = TrainMetrics(
        output_dir, progress.step, max_steps, accelerator.is_main_process, samples_per_step, trackers
    )
    # The small-card modes decode previews in tiles: whole 1024² decodes take ~3.5 GiB (bench/RESULTS.md).
    validator = Validator(cfg, eval_set, accelerator, output_dir, schedule, tiled_decode=plan.mode in SMALL_CARD_MODES)
    nonfinite = NonfiniteGuard(cfg.max_nonfinite_steps, output_dir)
    model = accelerator.unwrap_model(transformer)
    if progress.step == 0:  # the baseline: what the base model does before any training
        validate(validator, metrics, model, accelerator, cfg, 0, False, ema, params, baseline=True)
    batches = iter(loader)
    transformer.train()
    while progress.step < max_steps:
        result = optimizer_step(accelerator, transformer, optimizer, scheduler, params, batches, schedule, noise, cfg)
        progress.step += 1
        step, last = progress.step, progress.step == max_steps
        if ema is not None:
            ema.update(params, step, result.skipped)
        metrics.record(StepRecord(step, loader.epoch, scheduler.get_last_lr()[0], *result))
        checkpoint_due = cfg.checkpointing_steps and (step % cfg.checkpointing_steps == 0 or last)
        validation_due = validator.previews_due(step, last) or validator.loss_due(step, last)
        if step % cfg.logging_steps == 0 or last or checkpoint_due or validation_due:  # the one host sync
            for logged_step, loss, skipped in metrics.flush(progress.nonfinite_total, loader.skipped):
                progress.nonfinite_total += nonfinite.check(logged_step, loss, skipped)
        if validation_due:
            validate(validator, metrics, model, accelerator, cfg, step, last, ema, params)
        if checkpoint_due:
            state = {"lora_config": lora_config, "flavour": cfg.model_flavour, "run_id": claim.run_id}
            save_checkpoint(output_dir, step, accelerator, parts, state, cfg.checkpoints_total_limit)

    losses = [x for x in metrics.close() if math.isfinite(x)]  # skipped steps logged NaN
    check_ranks_agree(accelerator, params)
    lora_path = output_dir / export.LORA_FILE
    if accelerator.is_main_process:
        try:
            lora_path = export_final(model, ema, lora_config, output_dir, cfg)
        except OSError as err:  # a full or read-only disk at the very end: the checkpoints still hold the LoRA
            kept = list_checkpoints(output_dir)
            raise UserError(
                f"{output_dir}: cannot write the final LoRA ({err.strerror or err}). The last complete checkpoint "
                f"is {kept[-1] if kept else 'none'}: free space, then `train export` it"
            ) from None
        n = min(5, len(losses))
        if n:
            log.info(
                "done: step %d; loss mean of the first %d finite steps %.4f, of the last %d %.4f; "
                "%d non-finite step(s) skipped, %d unreadable sample(s) replaced on this process",
                progress.step,
                n,
                sum(losses[:n]) / n,
                n,
                sum(losses[-n:]) / n,
                progress.nonfinite_total,
                loader.skipped,
            )
    accelerator.wait_for_everyone()
    return lora_path


def validate(
    validator: Validator,
    metrics: TrainMetrics,
    model,
    accelerator,
    cfg: TrainConfig,
    step: int,
    last: bool,
    ema,
    params,
    baseline: bool = False,
) -> None:
    """The held-out loss and the previews due after `step`; `baseline`: before training, the base model (LoRA off)."""
    with accelerator.autocast(), attention_backends(cfg.prefer_cudnn_attention):
        if validator.loss_due(step, last or baseline):
            loss = validator.heldout_loss(model)
            log.info("held-out loss at step %d: %.5f", step, loss)
            metrics.heldout(step, loss)
        if not validator.previews_due(step, last or baseline):
            return
        if baseline:
            if not cfg.disable_benchmark:
                with lora_disabled(model):
                    metrics.image("previews/base", validator.previews(model, step, "base"), step)
            return
        metrics.image("previews/lora", validator.previews(model, step), step)
        if ema is not None:
            with weights_swapped(params, ema.state_dict()):
                metrics.image("previews/ema", validator.previews(model, step, "ema"), step)


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
        targets = cfg.lora_target if isinstance(cfg.lora_target, list) else LORA_TARGETS[cfg.lora_target]
        try:
            outcome = ("ok", claim_output_dir(output_dir, cfg, targets))
        except UserError as err:
            outcome = ("error", str(err))  # every rank raises it: none waits for a run that never starts
    kind, value = broadcast_object_list([outcome])[0]
    if kind == "error":
        raise UserError(value)
    return value


def report_memory_plan(plan: MemoryPlan, cfg: TrainConfig, explicit: set[str], tokens: int) -> None:
    """Say what the memory plan is, why, and which of the user's keys shaped it."""
    log.info("largest batch: %d tokens\n%s", tokens, plan.describe())
    chosen = sorted(k for k in explicit if k in MEMORY_KEYS)
    if chosen:
        log.info("  set in your config (these win over memory_mode): %s", ", ".join(chosen))
    if "gradient_checkpointing" in explicit and cfg.gradient_checkpointing and cfg.memory_mode == "auto":
        log.info(
            "  note: gradient_checkpointing true checkpoints every block, as in SimpleTuner; remove it to let "
            "memory_mode auto checkpoint only as many blocks as memory needs (faster)"
        )


class StepResult(NamedTuple):
    """One optimizer step, as 0-dim device tensors (reading them is a host sync: the metrics do, rarely)."""

    loss: torch.Tensor  # mean over micro-batches and processes
    grad_norm: torch.Tensor  # of all LoRA gradients, before clipping
    skipped: torch.Tensor  # 1.0 when the loss or the gradient was not finite: the update was not applied


def optimizer_step(
    accelerator, transformer, optimizer, scheduler, params, batches, schedule, noise, cfg: TrainConfig
) -> StepResult:
    """One optimizer step over `gradient_accumulation_steps` micro-batches, with no host sync.

    Every rank runs backward even on a non-finite loss (DDP's gradient all-reduce must match). The
    loss is averaged over ranks and the gradients are all-reduced, so every rank computes the same
    skip flag; the fused AdamW then applies or skips the update on the device. The schedule steps
    either way (as with AMP's GradScaler), so a skipped step still counts as a step.
    """
    total = torch.zeros((), device=accelerator.device)
    for _ in range(cfg.gradient_accumulation_steps):
        batch = next(batches).to(accelerator.device)
        attention = attention_backends(cfg.prefer_cudnn_attention)
        with accelerator.accumulate(transformer), accelerator.autocast(), attention:
            loss = flow_matching_loss(transformer, batch, schedule, noise)
            accelerator.backward(loss)
        total += loss.detach().float() / cfg.gradient_accumulation_steps
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "mean")
    grads = [p.grad for p in params.values() if p.grad is not None]
    if cfg.max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm(grads)
    skipped = (~(torch.isfinite(total) & torch.isfinite(grad_norm))).float()
    inner = optimizer.optimizer  # accelerate's wrapper holds the torch optimizer
    if skips_on_device(inner):
        inner.found_inf = skipped
        optimizer.step()
    elif not skipped.item():  # an optimizer that cannot skip on the device: one sync per step
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total, grad_norm.float(), skipped)


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
