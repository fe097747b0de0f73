"""`train run`: the LoRA training loop, run through accelerate (one GPU, several, or CPU)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm import tqdm

from shared.config import Config
from shared.errors import UserError
from shared.flavours import FLAVOURS
from train.export import save_lora_diffusers
from train.loader import CacheReader, TrainLoader
from train.model import load_lora_transformer
from train.objective import flow_matching_loss


def open_caches(config: Config) -> list[CacheReader]:
    """One reader per training dataset's cache (not the eval dataset's), refusing other flavours' caches."""
    mains = [m for m in config.main_datasets() if m.id != config.train.eval_dataset_id]
    readers = [CacheReader(config.cache_location_for(m), m.id, m.repeats, m.probability or None) for m in mains]
    for reader in readers:
        if reader.info["flavour"] != config.train.model_flavour:
            raise UserError(
                f"{reader.cache_dir}: built for {reader.info['flavour']}, but model_flavour is "
                f"{config.train.model_flavour}; rebuild it with `prep build-cache`"
            )
    return readers


def train(config: Config) -> Path:
    """Train a LoRA as `config` says; return the path of the saved LoRA file."""
    cfg = config.train
    accelerator = Accelerator(
        mixed_precision="bf16" if cfg.mixed_precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
    )
    set_seed(cfg.seed)
    loader = TrainLoader(
        open_caches(config),
        cfg.train_batch_size,
        cfg.seed,
        accelerator.process_index,
        accelerator.num_processes,
        workers=cfg.dataloader_num_workers,
        prefetch=cfg.dataloader_prefetch_factor,
    )
    per_epoch = loader.batches_per_epoch
    steps_per_epoch = max(1, per_epoch // cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch

    transformer = load_lora_transformer(cfg, accelerator.device)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    # accelerate steps the scheduler once per process per optimizer step: scale the counts to match.
    scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    transformer, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    batches = iter(loader)
    noise_rng = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + accelerator.process_index)

    accelerator.print(
        f"training {sum(p.numel() for p in params):,} LoRA parameters for {max_steps} steps "
        f"({per_epoch} batches/epoch/process, {accelerator.num_processes} process(es), {accelerator.device})"
    )
    transformer.train()
    progress = tqdm(range(max_steps), desc="train", disable=not accelerator.is_main_process)
    start = time.perf_counter()
    losses: list[float] = []
    for step in progress:
        step_loss = 0.0
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(batches).to(accelerator.device)
            with accelerator.accumulate(transformer), accelerator.autocast():
                loss = flow_matching_loss(transformer, batch, cfg.flow_schedule_shift, noise_rng)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach().item() / cfg.gradient_accumulation_steps
        if not math.isfinite(step_loss):
            raise UserError(f"loss became {step_loss} at step {step + 1}; lower learning_rate and retrain")
        losses.append(step_loss)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")

    accelerator.wait_for_everyone()
    out_dir = Path(cfg.output_dir)
    lora_path = out_dir / "pytorch_lora_weights.safetensors"
    if accelerator.is_main_process:
        lora_path = save_lora_diffusers(accelerator.unwrap_model(transformer), out_dir, FLAVOURS[cfg.model_flavour])
        seconds = time.perf_counter() - start
        n = min(5, len(losses))
        accelerator.print(
            f"done: {max_steps} steps in {seconds:.1f} s ({seconds / max_steps:.3f} s/step); loss mean of the "
            f"first {n} steps {sum(losses[:n]) / n:.4f}, of the last {n} steps {sum(losses[-n:]) / n:.4f}; "
            f"{loader.skipped} unreadable sample(s) skipped on this process"
        )
    accelerator.wait_for_everyone()
    return lora_path
