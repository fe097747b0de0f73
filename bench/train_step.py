"""Kernel-level: time the LoRA training step and its peak GPU memory per memory mode, at real Qwen-Image-Edit size.

The step alone, on synthetic batches: no cache, data loading, previews or held-out loss. What a
user's `train run` does end to end (and what the README's card table states) is measured by
bench/product.py.

    python bench/train_step.py                                   # every mode, edit-v1 and edit-v2 (3 refs), int8
    python bench/train_step.py --modes baseline fast --flavours edit-v1 --precision no_change
    python bench/train_step.py --modes auto --budget-gib 21.5 --cap-gib 23.5   # as a 24 GB card
    python bench/train_step.py --gpus 1 2 4 --modes fast                        # DDP through accelerate
    python bench/train_step.py --size tiny --device cpu --modes baseline fast   # anywhere

Each configuration runs in its own process (so peak memory is its own), through accelerate and
the loop's own `optimizer_step` (loss under bf16 autocast, backward, the all-rank finite check,
clipping, AdamW, the LR schedule), on the real transformer shapes (60 blocks, 3072 wide, 20B
parameters) with random weights, built on the host in bf16 and placed block by block as `train run`
places a loaded checkpoint. `baseline` is the path before memory modes: every block checkpointed,
eager, nothing offloaded. Modes size themselves to `--budget-gib` (default: the free memory);
`--cap-gib` makes the allocator refuse more than that, as a smaller card would.

Shapes: edit-v1 is a 1024² target with one 1024² reference (4096 + 4096 image tokens); edit-v2 has
three 1024² references (16384 image tokens); both with a 1400-token VL embedding, one sample per GPU.
Useful FLOPs count the linear layers' forward and input gradients and attention's forward and
backward (no recomputation); MFU divides by the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    "real": dict(
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
    ),
    "tiny": dict(
        num_layers=4, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)
    ),
}
REFERENCES = {"edit-v1": 1, "edit-v2": 3}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM


def build_transformer(size: str, device: torch.device) -> torch.nn.Module:
    """The transformer at `size` in bf16 on the host, as `from_pretrained` leaves a checkpoint; random
    weights (std 0.02) drawn on `device` block by block, so building 20B parameters takes seconds."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():  # parameters on the meta device; buffers (RoPE tables) real
        model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, **SIZES[size])
    generator = torch.Generator(device=device).manual_seed(0)
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                value = torch.randn(param.shape, generator=generator, device=device, dtype=torch.bfloat16) * 0.02
                module._parameters[name] = torch.nn.Parameter(value.cpu(), requires_grad=False)
    return model


def useful_flops(config: dict, image_tokens: int, text_tokens: int) -> float:
    """FLOPs a step must do: per block, each stream's linear layers forward and input gradient
    (2 x 2 x tokens x in x out) and joint attention forward + backward (4 T² d, backward 2.5x)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    per_token_linear = 4 * d * d + 2 * 4 * d * d  # q, k, v, out; MLP 4x up and down
    linear = 2 * 2 * (image_tokens + text_tokens) * per_token_linear
    attention = 4 * (image_tokens + text_tokens) ** 2 * d * 3.5
    return config["num_layers"] * (linear + attention)


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process (or these accelerate processes); returns its row."""
    from accelerate import Accelerator

    from shared.config import TrainConfig
    from train.batch import Batch
    from train.memory import GIB, MemoryPlan, choose_plan, host_swap_budget, step_costs
    from train.model import prepare_for_lora
    from train.objective import SigmaSchedule
    from train.optim import build_optimizer, build_scheduler
    from train.step import optimizer_step

    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    accelerator = Accelerator(mixed_precision="bf16")
    device = accelerator.device
    cuda = device.type == "cuda"
    if cuda and args.cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * GIB / total, torch.cuda.current_device())
    n_refs = REFERENCES[args.flavour]
    latent = args.resolution // 8
    image_tokens = (1 + n_refs) * (latent // 2) ** 2
    tokens = image_tokens + args.text_tokens
    config = TrainConfig(
        base_model_precision=args.precision,
        quantize_via="accelerator",
        lora_rank=args.rank,
        lora_alpha=args.rank,
        lora_target=args.target,
        memory_mode="auto" if args.mode in ("auto", "baseline") else args.mode,
        memory_budget_gib=args.budget_gib,
        prefer_cudnn_attention=args.cudnn_attention,
    )
    t0 = time.perf_counter()
    transformer = build_transformer(args.size, device)
    costs = step_costs(transformer, config, tokens)
    budget = args.budget_gib * GIB if args.budget_gib else (torch.cuda.mem_get_info(device)[0] if cuda else 0.0)
    explicit = set()
    if args.mode == "baseline":
        n = costs.n_blocks
        estimate = costs.estimate(n, 0, False, False)
        plan = MemoryPlan("baseline", n, frozenset(range(n)), (), False, False, estimate, budget)
    else:
        if args.compile is not None:
            config.compile_blocks, explicit = args.compile, {"compile_blocks"}
        for key, value in (item.split("=", 1) for item in args.set):  # as if set in the user's config
            setattr(config, key, json.loads(value))
            explicit.add(key)
        plan = choose_plan(config, costs, budget, explicit, host_swap_budget())
    torch.manual_seed(0)  # the same LoRA initialisation in every configuration
    transformer = prepare_for_lora(transformer, config, device, plan)
    params = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(list(params.values()), config)
    scheduler = build_scheduler(optimizer, config, args.warmup + args.steps)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)  # the schedule counts optimizer steps
    if cuda:
        # Peaks of the steps only: the bf16 blocks pass through the GPU once while being quantised.
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated() / GIB
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    setup = time.perf_counter() - t0
    text_dim = accelerator.unwrap_model(transformer).config.joint_attention_dim
    g = torch.Generator(device=device).manual_seed(accelerator.process_index)
    batch = Batch(
        target=torch.randn(1, 16, latent, latent, device=device, generator=g).bfloat16(),
        references=[torch.randn(1, 16, latent, latent, device=device, generator=g).bfloat16() for _ in range(n_refs)],
        prompt=torch.randn(1, args.text_tokens, text_dim, device=device, generator=g).bfloat16(),
        prompt_mask=None,
    )
    batches = itertools.repeat(batch)
    schedule = SigmaSchedule(shift=1.73)
    transformer.train()
    if args.grads_dir:
        save_gradients(transformer, params, batch, schedule, accelerator, args.grads_dir / f"{args.one}.safetensors")
    times, warmup_s = [], 0.0
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = optimizer_step(accelerator, transformer, optimizer, scheduler, params, batches, schedule, g, config)[0]
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
        else:
            warmup_s += elapsed
    times.sort()
    s_per_step = times[len(times) // 2]
    if args.profile:
        profile_step(
            args,
            lambda: optimizer_step(
                accelerator, transformer, optimizer, scheduler, params, batches, schedule, g, config
            ),
        )
    previews = {}
    if args.preview_steps:
        previews = measure_previews(transformer, batch, schedule, accelerator, args, config)
        # a training step after the previews: it must still fit, at its usual peak
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        optimizer_step(accelerator, transformer, optimizer, scheduler, params, batches, schedule, g, config)
        if cuda:
            previews["step after previews peak alloc GiB"] = torch.cuda.max_memory_allocated(device) / GIB
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
    tflops = useful_flops(SIZES[args.size], image_tokens, args.text_tokens) / s_per_step / 1e12
    row = {
        "flavour": f"{args.flavour} ({n_refs} ref)",
        "precision": args.precision,
        "mode": (f"auto → {plan.mode}" if args.mode == "auto" else args.mode)
        + ("" if args.cudnn_attention else " (no cuDNN attn)"),
        "plan": f"ckpt {len(plan.checkpointed)}, swap {len(plan.swapped)}, offload {int(plan.offload_activations)}, "
        f"compile {int(plan.compile_blocks)}" + "".join(f", {item}" for item in args.set),
        "GPUs": accelerator.num_processes,
        "s/step": s_per_step,
        "samples/s": accelerator.num_processes / s_per_step,
        "TFLOP/s": tflops,
        "MFU": tflops / peak_tflops,
        "model GiB": weights if cuda else float("nan"),
        "peak alloc GiB": torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan"),
        "peak reserved GiB": torch.cuda.max_memory_reserved(device) / GIB if cuda else float("nan"),
        "estimate GiB": plan.estimate_bytes / GIB,
        "warmup s": warmup_s,
        "setup s": setup,
        "loss": float(loss),
        "card": name,
        **previews,
    }
    accelerator.end_training()
    return row


def profile_step(args: argparse.Namespace, step) -> None:
    """One more step under torch.profiler: where the GPU's time goes (top kernels and copies), and how
    much of the step it was busy, to `--profile`/<configuration>.txt."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6  # seconds of kernels and copies (all streams)
    table = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
    args.profile.mkdir(parents=True, exist_ok=True)
    path = args.profile / f"{args.one.replace(',', '_')}{'_' + '_'.join(args.set) if args.set else ''}.txt"
    path.write_text(f"step wall {wall:.3f} s (profiled), device busy {busy:.3f} s summed over streams\n{table}")


def measure_previews(transformer, batch, schedule, accelerator, args, config) -> dict:
    """Time one preview (sampling with true CFG, then decoding with a real-size VAE decoder, random weights) and
    the held-out loss of one sample at 8 σ values, as `train run` does between steps; peak memory of each."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler

    from shared.tiny_model import SCHEDULER_CONFIG
    from train.eval_data import EvalSample
    from train.memory import GIB
    from train.objective import velocity_errors
    from train.previews import Decoder, sample_latents
    from train.run import SMALL_CARD_MODES
    from train.validation import evaluating, release_memory

    device, cuda = accelerator.device, accelerator.device.type == "cuda"
    model = accelerator.unwrap_model(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)  # the checkpoints' settings
    vae = AutoencoderKLQwenImage()  # diffusers' defaults are Qwen-Image's VAE (base_dim 96, z_dim 16)
    vae.decoder.to(device, torch.bfloat16)
    vae.post_quant_conv.to(device, torch.bfloat16)
    decoder = Decoder(vae, device, tiled=args.mode in SMALL_CARD_MODES)  # as train run decodes in that mode
    sample = EvalSample(
        0,
        "0" * 20,
        "bench",
        "bench",
        batch.target[0].cpu(),
        [r[0].cpu() for r in batch.references],
        batch.prompt[0].cpu(),
        batch.prompt[0, :16].cpu(),
    )
    out = {}

    def measured(name, fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
            out[f"{name} peak alloc GiB"] = torch.cuda.max_memory_allocated(device) / GIB
            out[f"{name} peak reserved GiB"] = torch.cuda.max_memory_reserved(device) / GIB
        out[f"{name} s"] = time.perf_counter() - start
        return result

    def heldout():
        sigmas = schedule.quantiles(8, batch.target[0, 0].numel() // 4)
        with evaluating(model):
            noise = torch.randn((1, batch.target[0, 0].numel() // 4, 64), device=device)
            return [velocity_errors(model, batch, s.reshape(1).to(device), noise) for s in sigmas]

    with accelerator.autocast():
        with evaluating(model):
            args_ = (model, scheduler, sample, args.preview_steps, 4.0, 0, device)
            measured("first preview sampling", lambda: sample_latents(*args_))  # compiles the no-grad blocks
            latents = measured("preview sampling", lambda: sample_latents(*args_))
        measured("preview decode", lambda: decoder(latents))
        measured("held-out loss", heldout)
    release_memory()
    out["preview steps"] = args.preview_steps
    return out


def save_gradients(transformer, params: dict, batch, schedule, accelerator, path: Path) -> None:
    """Loss and LoRA gradients of one fixed batch and σ, saved for `compare_gradients` (lora_B is made
    non-zero first, so lora_A gets a gradient too). Nothing is stepped."""
    from safetensors.torch import save_file

    from train.objective import flow_matching_loss

    generator = torch.Generator(device=accelerator.device).manual_seed(1)
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator, device=p.device) * 1e-3)
    with accelerator.autocast():
        loss = flow_matching_loss(transformer, batch, schedule, torch.Generator(accelerator.device).manual_seed(2))
    accelerator.backward(loss)
    grads = {name: p.grad.detach().float().cpu() for name, p in params.items()}
    grads["loss"] = loss.detach().float().cpu().reshape(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(grads, str(path))
    with torch.no_grad():
        for name, p in params.items():
            p.grad = None
            if "lora_B" in name:
                p.zero_()  # back to peft's initialisation for the timed steps


def compare_gradients(directory: Path) -> None:
    """Each configuration's loss and LoRA gradients against the baseline of the same flavour and precision."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    for path in files:
        flavour, precision, mode = path.stem.split(",")
        reference = directory / f"{flavour},{precision},baseline.safetensors"
        if mode == "baseline" or not reference.exists():
            continue
        ref, got = load_file(str(reference)), load_file(str(path))
        errors = sorted(((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)).item() for k in ref if k != "loss")
        print(
            f"parity {flavour} {precision} {mode} vs baseline: loss {got['loss'].item():.5f} vs "
            f"{ref['loss'].item():.5f}; LoRA gradient relative error median {errors[len(errors) // 2]:.2e}, "
            f"max {errors[-1]:.2e} over {len(errors)} tensors"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--flavours", nargs="+", default=list(REFERENCES), choices=list(REFERENCES))
    parser.add_argument("--modes", nargs="+", default=["baseline", "fast", "balanced", "low", "minimal"])
    parser.add_argument("--precision", nargs="+", default=["int8-quanto"])
    parser.add_argument("--budget-gib", type=float, default=0.0, help="memory budget the modes size to (0: free)")
    parser.add_argument("--cap-gib", type=float, default=0.0, help="refuse allocations beyond this (a smaller card)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="override compile")
    parser.add_argument("--cudnn-attention", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts; > 1 runs under accelerate launch")
    parser.add_argument("--resolution", type=int, default=1024, help="target and reference side, pixels")
    parser.add_argument("--text-tokens", type=int, default=1400, help="VL embedding length")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target", default="attention")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument("--preview-steps", type=int, default=0, help="also time a preview of this many steps")
    parser.add_argument("--grads-dir", type=Path, help="save each configuration's gradients here and compare")
    parser.add_argument("--json", type=Path, help="append every row to this JSON-lines file")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON", help="config keys, as a user sets them")
    parser.add_argument("--profile", type=Path, help="profile one more step; write its top kernels here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "flavour,precision,mode" in this process
    parser.add_argument("--render", type=Path, help="only print the table of a --json file")
    args = parser.parse_args()
    if args.render:
        print_table([json.loads(line) for line in args.render.read_text().splitlines() if line.strip()])
        return
    if args.one:
        args.flavour, args.precision, args.mode = args.one.split(",")
        row = run_one(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("ROW " + json.dumps(row), flush=True)
        return

    rows = []
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--one")]
    for flavour, precision, mode, gpus in itertools.product(args.flavours, args.precision, args.modes, args.gpus):
        launcher = [sys.executable]
        if gpus > 1:
            launcher += ["-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
        command = launcher + [__file__, *passthrough, "--one", f"{flavour},{precision},{mode}"]
        env = dict(os.environ)
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `train run` sets it
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
            out = result.stdout + result.stderr
        except subprocess.TimeoutExpired as err:
            text = [t.decode() if isinstance(t, bytes) else (t or "") for t in (err.stdout, err.stderr)]
            out = "".join(text) + f"\ntimed out after {args.timeout} s"
        found = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
        if not found:
            tail = out.strip().splitlines()[-15:]
            error = " | ".join(tail)[-1500:]
            row = {"flavour": flavour, "precision": precision, "mode": mode, "GPUs": gpus, "error": error}
        else:
            row = found[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if args.grads_dir:
        compare_gradients(args.grads_dir)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """The rows as a Markdown table (failed configurations say why)."""
    keys = ["flavour", "precision", "mode", "plan", "GPUs", "s/step", "samples/s", "TFLOP/s", "MFU"]
    keys += ["peak alloc GiB", "peak reserved GiB", "estimate GiB", "model GiB", "card"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        if "error" in row:
            print(f"| {row['flavour']} | {row['precision']} | {row['mode']} | FAILED: {row['error'][-300:]} |")
            continue
        print("| " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
