"""`train run`: the LoRA training loop, run through accelerate (one GPU, several, several nodes, or CPU).

The loop, in order: read the caches, build the model, the optimizer and its schedule, resume from
a checkpoint if asked, then repeat the optimizer step (accumulated micro-batches; a non-finite
loss skips the step on every rank), the EMA update, the logs and the periodic checkpoint; at
the end export the LoRA (and its EMA) in diffusers and ComfyUI formats.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from peft.utils import get_peft_model_state_dict

from shared.cache.fingerprint import TRAINING_INDEPENDENT, changed_settings, fingerprint
from shared.config import Config, TrainConfig
from shared.errors import UserError
from shared.flavours import FLAVOURS
from shared.models import load_scheduler_config
from train import export
from train.blocks import attention_backends
from train.checkpoint import Resumable, list_checkpoints, load_checkpoint, save_checkpoint
from train.ema import LoraEMA
from train.loader import CacheReader, TrainLoader
from train.memory import MEMORY_KEYS, MemoryPlan
from train.metrics import TrainMetrics
from train.model import LORA_TARGETS, check_lora_targets, load_lora_transformer
from train.objective import SigmaSchedule, flow_matching_loss
from train.optim import build_optimizer, build_scheduler
from train.output_dir import RunClaim, claim_output_dir


def open_caches(config: Config) -> list[CacheReader]:
    """One reader per training dataset's cache (not the eval dataset's), refusing other flavours' caches."""
    mains = [m for m in config.main_datasets() if m.id != config.train.eval_dataset_id]
    readers = [CacheReader(config.cache_location_for(m), m.id, m.repeats, m.probability or None) for m in mains]
    for reader, main in zip(readers, mains, strict=True):
        if reader.info["flavour"] != config.train.model_flavour:
            raise UserError(
                f"{reader.location}: built for {reader.info['flavour']}, but model_flavour is "
                f"{config.train.model_flavour}; rebuild it with `prep build-cache`"
            )
        # The cache must hold what this config's prep settings would encode (resolution, crops, model,
        # template, ...): otherwise training would silently learn from other data.
        expected = fingerprint(config, main, dtype=None)["settings"]
        built = reader.info.get("fingerprint", {}).get("settings", {})
        changed = changed_settings(built, expected, ignore=TRAINING_INDEPENDENT)
        if changed:
            raise UserError(
                f"{reader.location}: built with other prep settings than {config.config_path} gives (changed: "
                f"{', '.join(changed)}); rebuild it with `prep build-cache --config {config.config_path} --force`, "
                "or train with the config it was built with"
            )
    return readers


def train(config: Config) -> Path:
    """Train a LoRA as `config` says; return the path of the diffusers LoRA file."""
    cfg = config.train
    accelerator = Accelerator(
        mixed_precision="bf16" if cfg.mixed_precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
    )
    set_seed(cfg.seed)
    flavour = FLAVOURS[cfg.model_flavour]
    output_dir = Path(cfg.output_dir)
    check_lora_targets(cfg)  # before anything loads: on an empty model built from the config
    claim = claim_on_main(accelerator, output_dir, cfg)  # whose folder is this?

    # Data: this rank's share of every batch, in the order fixed by (seed, manifests).
    loader = TrainLoader(
        open_caches(config),
        cfg.train_batch_size,
        cfg.seed,
        accelerator.process_index,
        accelerator.num_processes,
        workers=cfg.dataloader_num_workers,
        prefetch=cfg.dataloader_prefetch_factor,
        caption_dropout=cfg.caption_dropout_probability,
    )
    steps_per_epoch = max(1, loader.batches_per_epoch // cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch

    # Model and optimisation: frozen (quantised) base placed as the memory plan says, fp32 LoRA,
    # AdamW, schedule, EMA.
    tokens = loader.largest_batch_tokens(cfg.train_batch_size)
    transformer, plan = load_lora_transformer(cfg, accelerator.device, tokens, config.explicit)
    report_memory_plan(accelerator, plan, cfg, config.explicit, tokens)
    params = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
    lora_config = export.json_safe(transformer.peft_config["default"].to_dict())
    optimizer = build_optimizer(list(params.values()), cfg)
    scheduler = build_scheduler(optimizer, cfg, max_steps, accelerator.num_processes)
    transformer, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    ema = None
    if cfg.use_ema:
        ema = LoraEMA(params, cfg.ema_decay, "cpu" if cfg.ema_device == "cpu" else accelerator.device)
    schedule = SigmaSchedule.from_config(cfg, load_scheduler_config(cfg.pretrained_model_name_or_path))
    noise = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + accelerator.process_index)

    run = Resumable(params, optimizer, scheduler, ema, loader, noise)
    step, nonfinite_total = 0, 0
    resume = claim.resume
    if resume is not None:
        restored = load_checkpoint(resume, accelerator, run)
        step, nonfinite_total = restored["step"], restored["nonfinite_total"]
        accelerator.print(f"resumed from {resume} at step {step} (epoch {loader.epoch})")
    accelerator.print(
        f"training {sum(p.numel() for p in params.values()):,} LoRA parameters for {max_steps} steps "
        f"({loader.batches_per_epoch} batches/epoch/process, {accelerator.num_processes} process(es), "
        f"{accelerator.device})"
    )

    metrics = TrainMetrics(output_dir, step, max_steps, cfg.report_to, accelerator.is_main_process)
    batches = iter(loader)
    transformer.train()
    nonfinite_run = 0
    samples_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    while step < max_steps:
        loss, finite = optimizer_step(
            accelerator, transformer, optimizer, scheduler, params, batches, schedule, noise, cfg
        )
        if not finite:  # skipped on every rank; the weights are still the last good ones
            nonfinite_run, nonfinite_total = nonfinite_run + 1, nonfinite_total + 1
            accelerator.print(f"warning: loss was {loss} before step {step + 1}; step skipped")
            if nonfinite_run >= cfg.max_nonfinite_steps:
                kept = list_checkpoints(output_dir)
                raise UserError(
                    f"loss was NaN/inf for {nonfinite_run} steps in a row after step {step}; stopping. "
                    f"Last good checkpoint: {kept[-1] if kept else 'none'}. Lower learning_rate (or check the "
                    "cache with `prep verify`), then resume with resume_from_checkpoint."
                )
            continue
        nonfinite_run = 0
        step += 1
        if ema is not None:
            ema.update(params, step)
        metrics.step(
            step, loader.epoch, loss, scheduler.get_last_lr()[0], samples_per_step, nonfinite_total, loader.skipped
        )
        if cfg.checkpointing_steps and (step % cfg.checkpointing_steps == 0 or step == max_steps):
            state = {
                "nonfinite_total": nonfinite_total,
                "lora_config": lora_config,
                "flavour": flavour.name,
                "run_id": claim.run_id,
            }
            save_checkpoint(output_dir, step, accelerator, run, state, cfg.checkpoints_total_limit)

    losses = metrics.close()
    check_ranks_agree(accelerator, params)
    lora_path = output_dir / export.LORA_FILE
    if accelerator.is_main_process:
        try:
            lora_path = export_final(accelerator.unwrap_model(transformer), ema, lora_config, output_dir, cfg)
        except OSError as err:  # a full or read-only disk at the very end: the checkpoints still hold the LoRA
            kept = list_checkpoints(output_dir)
            raise UserError(
                f"{output_dir}: cannot write the final LoRA ({err.strerror or err}). The last complete checkpoint "
                f"is {kept[-1] if kept else 'none'}: free space, then `train export` it"
            ) from None
        n = min(5, len(losses))
        if n:
            accelerator.print(
                f"done: step {step}; loss mean of the first {n} steps {sum(losses[:n]) / n:.4f}, "
                f"of the last {n} steps {sum(losses[-n:]) / n:.4f}; {nonfinite_total} non-finite step(s) skipped, "
                f"{loader.skipped} unreadable sample(s) replaced on this process"
            )
    accelerator.wait_for_everyone()
    return lora_path


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


def report_memory_plan(accelerator, plan: MemoryPlan, cfg: TrainConfig, explicit: set[str], tokens: int) -> None:
    """Say what the memory plan is, why, and which of the user's keys shaped it."""
    accelerator.print(f"largest batch: {tokens} tokens\n{plan.describe()}")
    chosen = sorted(k for k in explicit if k in MEMORY_KEYS)
    if chosen:
        accelerator.print(f"  set in your config (these win over memory_mode): {', '.join(chosen)}")
    if "gradient_checkpointing" in explicit and cfg.gradient_checkpointing and cfg.memory_mode == "auto":
        accelerator.print(
            "  note: gradient_checkpointing true checkpoints every block, as in SimpleTuner; remove it to let "
            "memory_mode auto checkpoint only as many blocks as memory needs (faster)"
        )


def optimizer_step(accelerator, transformer, optimizer, scheduler, params, batches, schedule, noise, cfg: TrainConfig):
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns (mean loss, finite?).

    Every rank runs backward even on a non-finite loss (DDP's gradient all-reduce must match),
    then all ranks agree: a non-finite loss on any of them skips the update everywhere.
    """
    total = torch.zeros((), device=accelerator.device)
    for _ in range(cfg.gradient_accumulation_steps):
        batch = next(batches).to(accelerator.device)
        attention = attention_backends(cfg.prefer_cudnn_attention)
        with accelerator.accumulate(transformer), accelerator.autocast(), attention:
            loss = flow_matching_loss(transformer, batch, schedule, noise)
            accelerator.backward(loss)
        total += loss.detach().float() / cfg.gradient_accumulation_steps
    finite = bool(accelerator.gather(torch.isfinite(total).reshape(1)).all())
    if finite:
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(total, "mean").item(), finite


def check_ranks_agree(accelerator, params: dict[str, torch.nn.Parameter]) -> None:
    """Every process must end with the same LoRA (DDP keeps them in step); say so, or stop loudly."""
    if accelerator.num_processes == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in params.values()]).to(accelerator.device)
    gathered = accelerator.gather(sums[None]).cpu()  # [processes, n_params]
    if not (gathered == gathered[0]).all():
        raise UserError("the LoRA weights differ between processes after training; this is a bug, please report it")
    accelerator.print(f"LoRA weights identical on {accelerator.num_processes} processes")


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
