"""Time the LoRA training step and its peak GPU memory, at real Qwen-Image-Edit size with random weights.

    python bench/train_step.py --size real --precision no_change int8-quanto      # one GPU
    accelerate launch --num_processes 2 bench/train_step.py --size real           # DDP on 2 GPUs
    python bench/train_step.py --size tiny --device cpu                           # anywhere

Runs the loop's own optimizer step (`train.loop.optimizer_step`: flow-matching loss under bf16
autocast, backward, the all-rank finite check, gradient clipping, AdamW, the LR schedule) through
accelerate, so several processes train with DDP exactly as `train run` does. The transformer has
the real shapes (60 blocks, 3072 wide, 20B parameters), built in place on each device; only the
weights are random. Default shapes are an edit-v1 sample at 1024²: 4096 target tokens, 4096
reference tokens and a ~1.4k-token VL embedding, one sample per GPU per step.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
from accelerate import Accelerator
from diffusers import QwenImageTransformer2DModel

from shared.config import TrainConfig
from train.loader import Batch
from train.loop import optimizer_step
from train.model import prepare_for_lora
from train.objective import SigmaSchedule
from train.optim import build_optimizer, build_scheduler

SIZES = {
    "real": dict(
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
    ),
    "tiny": dict(
        num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)
    ),
}


def build_transformer(size: str, device: torch.device) -> torch.nn.Module:
    """The transformer at `size`, initialised directly on `device` in bf16 (no host copy of 41 GB)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, **SIZES[size])
    finally:
        torch.set_default_dtype(default)


def bench(args: argparse.Namespace, precision: str, accelerator: Accelerator) -> dict:
    device = accelerator.device
    config = TrainConfig(
        base_model_precision=precision,
        quantize_via="accelerator",
        lora_rank=args.rank,
        lora_alpha=args.rank,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_target=args.target,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    transformer = prepare_for_lora(build_transformer(args.size, device), config, device)
    params = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(list(params.values()), config)
    scheduler = build_scheduler(optimizer, config, args.warmup + args.steps, accelerator.num_processes)
    transformer, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    setup = time.perf_counter() - t0
    if device.type == "cuda":
        # Peak while training, not while building: the bf16 weights exist briefly before quantisation.
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:
        weights = float("nan")
    latent = args.resolution // 8
    text_dim = accelerator.unwrap_model(transformer).config.joint_attention_dim
    g = torch.Generator(device=device).manual_seed(accelerator.process_index)
    batch = Batch(
        target=torch.randn(1, 16, latent, latent, device=device, generator=g).bfloat16(),
        references=[torch.randn(1, 16, latent, latent, device=device, generator=g).bfloat16()],
        prompt=torch.randn(1, args.text_tokens, text_dim, device=device, generator=g).bfloat16(),
        prompt_mask=None,
    )
    batches = itertools.repeat(batch)
    schedule = SigmaSchedule(shift=1.73)
    transformer.train()
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = optimizer_step(accelerator, transformer, optimizer, scheduler, params, batches, schedule, g, config)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    s_per_step = times[len(times) // 2]
    result = {
        "precision": precision,
        "GPUs" if device.type == "cuda" else "processes": accelerator.num_processes,
        "s/step (median)": s_per_step,
        "samples/s": accelerator.num_processes / s_per_step,
        "model GiB": weights,
        "peak GiB (steps)": peak,
        "setup s": setup,
        "loss": loss,
        "lora params": sum(p.numel() for p in params.values()),
    }
    del transformer, optimizer, params
    accelerator.free_memory()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--precision", nargs="+", default=["no_change", "int8-quanto"])
    parser.add_argument("--resolution", type=int, default=1024, help="target and reference side, pixels")
    parser.add_argument("--text-tokens", type=int, default=1400, help="VL embedding length")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target", default="attention")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    accelerator = Accelerator(mixed_precision="bf16")
    name = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu"
    accelerator.print(
        f"device: {accelerator.num_processes} x {name}; size {args.size}; {args.resolution}² edit-v1 shapes; "
        f"{args.text_tokens} text tokens"
    )
    rows = [bench(args, precision, accelerator) for precision in args.precision]
    keys = list(rows[0])
    accelerator.print(" | ".join(keys))
    for row in rows:
        accelerator.print(" | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    accelerator.end_training()


if __name__ == "__main__":
    main()
