"""Kernel-level: the training step alone, per memory mode, timed on the product's own `Run`, at real size.

    python bench/train_step.py                                   # every mode, edit-v1 and edit-v2 (3 refs), int8
    python bench/train_step.py --modes baseline fast --flavours edit-v1 --precision no_change
    python bench/train_step.py --modes auto --budget-gib 21.5 --cap-gib 23.5   # as a 24 GB card
    python bench/train_step.py --modes low --set offload_activations=true      # a key as a user sets it
    python bench/train_step.py --gpus 1 2 4 --modes fast                        # DDP through accelerate
    python bench/train_step.py --size tiny --device cpu --modes baseline fast   # anywhere

Once per work folder (`--work`) it writes what bench/product.py writes: a random Qwen-Image-Edit
checkpoint on disk (`--size real`: the real transformer, 60 blocks 3072 wide, 20B parameters, and
VAE; a two-layer Qwen2.5-VL of real widths) and, per flavour, edit pairs of one shape
(`--resolution`² target and references, captions of 4 to 30 words) cached by `prep build-cache`'s
own `build_cache`. Each configuration then runs in its own process (so peak memory is its own) as
`train run` would: `Run(config)` (accelerate, the caches, the model loaded, quantised and placed by
the memory plan, LoRA, AdamW, the schedule) and `run.step()` timed between host syncs; no eval
samples, previews, held-out loss or checkpoints (bench/product.py measures those through the
command line). `baseline` is the path before memory modes: every block checkpointed, eager,
nothing offloaded or swapped. Modes size themselves to `--budget-gib` (`memory_budget_gib`; default:
the free memory); `--cap-gib` makes the allocator refuse more than that, as a smaller card would.

Useful FLOPs count the linear layers' forward and input gradients and attention's forward and
backward (no recomputation) for the largest batch's tokens; MFU divides by the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCES = {"edit-v1": 1, "edit-v2": 3}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM
PAIRS = 8  # the steps cycle through them
# Every configuration's run: no eval split, previews, held-out loss or checkpoints (the caches are built with it too).
RUN_KEYS = {"eval_holdout": 0, "validation_step_interval": 0, "checkpointing_steps": 0, "logging_steps": 1000}


def useful_flops(config, tokens: int) -> float:
    """FLOPs a step must do for `tokens` (image and text) tokens: per block, each stream's linear layers
    forward and input gradient (2 x 2 x tokens x in x out) and joint attention forward + backward (4 T² d,
    backward 2.5x). `config`: the transformer's."""
    d = config.num_attention_heads * config.attention_head_dim
    per_token_linear = 4 * d * d + 2 * 4 * d * d  # q, k, v, out; MLP 4x up and down
    linear = 2 * 2 * tokens * per_token_linear
    attention = 4 * tokens**2 * d * 3.5
    return config.num_layers * (linear + attention)


def prepare(args: argparse.Namespace, flavour: str) -> Path:
    """The checkpoint, dataset, config.json and cache of `flavour` in `--work` (each made once); the config's path."""
    from bench.product import write_config, write_dataset, write_model
    from prep.build import build_cache
    from shared.config import load_config

    model = write_model(args.work / f"model-{args.size}", args.size)
    n_refs = REFERENCES[flavour]
    data = write_dataset(args.work / f"data-{n_refs}ref-{args.resolution}", PAIRS, n_refs, args.resolution, buckets=1)
    settings = argparse.Namespace(resolution=args.resolution, steps=2, preview_steps=1)  # no previews: RUN_KEYS
    path = write_config(args.work, f"{flavour}:card", model, data, n_refs, settings)
    build_cache(load_config(path, RUN_KEYS), device=args.device)  # "up to date" after the first time
    return path


def configuration(args: argparse.Namespace) -> dict:
    """The config keys of this process's configuration, as a user would set them in config.json."""
    keys = dict(
        RUN_KEYS,
        output_dir=str(args.work / "runs" / args.one.replace(",", "-")),
        max_train_steps=args.warmup + args.steps + 2,
        base_model_precision=args.precision,
        lora_rank=args.rank,
        lora_alpha=args.rank,
        lora_target=args.target,
        memory_budget_gib=args.budget_gib,
    )
    if args.mode == "baseline":  # the path before memory modes
        keys.update(
            gradient_checkpointing=True, selective_checkpointing=False, compile_blocks=False, offload_activations=False
        )
        keys.update(blocks_to_swap=0)
    else:
        keys["memory_mode"] = args.mode
    if args.compile is not None:
        keys["compile_blocks"] = args.compile
    keys.update({key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)})
    return keys


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process (or these accelerate processes): `Run(config)`, then timed steps."""
    from shared.config import load_config
    from train.memory import GIB
    from train.run import Run

    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if cuda and args.cap_gib:
        gpu = int(os.environ.get("LOCAL_RANK", "0"))  # this process's GPU under accelerate launch
        total = torch.cuda.get_device_properties(gpu).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * GIB / total, gpu)
    keys = configuration(args)  # its output_dir was emptied by the parent: a fresh run, never a resume
    t0 = time.perf_counter()
    run = Run(load_config(args.config, keys))
    if cuda:
        # Peaks of the steps only: the bf16 blocks pass through the GPU once while being quantised.
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated() / GIB
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    setup = time.perf_counter() - t0
    if args.grads_dir:
        save_gradients(run, args.grads_dir / f"{args.one}.safetensors")
    times, warmup_s, loss = [], 0.0, float("nan")
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = run.step().loss
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
        profile_step(args, run.step)
    plan = run.plan
    tokens = run.loader.largest_batch_tokens(run.cfg.train_batch_size)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
    tflops = useful_flops(run.model.config, tokens) / s_per_step / 1e12
    row = {
        "flavour": f"{args.flavour} ({REFERENCES[args.flavour]} ref)",
        "precision": args.precision,
        "mode": f"auto → {plan.mode}" if args.mode == "auto" else args.mode,
        "plan": f"ckpt {len(plan.checkpointed)}{' sel' if plan.selective else ''}, swap {len(plan.swapped)}, "
        f"offload {int(plan.offload_activations)}, "
        f"compile {int(plan.compile_blocks)}" + "".join(f", {item}" for item in args.set),
        "GPUs": run.accelerator.num_processes,
        "tokens": tokens,
        "s/step": s_per_step,
        "samples/s": run.accelerator.num_processes / s_per_step,
        "TFLOP/s": tflops,
        "MFU": tflops / peak_tflops,
        "model GiB": weights if cuda else float("nan"),
        "peak alloc GiB": torch.cuda.max_memory_allocated() / GIB if cuda else float("nan"),
        "peak reserved GiB": torch.cuda.max_memory_reserved() / GIB if cuda else float("nan"),
        "estimate GiB": plan.estimate_bytes / GIB,
        "warmup s": warmup_s,
        "setup s": setup,
        "loss": float(loss),
        "card": name,
    }
    run.accelerator.end_training()
    return row


def profile_step(args: argparse.Namespace, step) -> None:
    """One more step under torch.profiler: where the GPU's time goes (top kernels and copies), and how
    much of the step it was busy, to `--profile`/<configuration>.txt."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        raise SystemExit("--profile needs a GPU")
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


def save_gradients(run, path: Path) -> None:
    """Loss and LoRA gradients of the run's first batch at a fixed σ, saved for `compare_gradients` (lora_B
    is made non-zero first, so lora_A gets a gradient too). Nothing is stepped."""
    from safetensors.torch import save_file

    from train.objective import flow_matching_loss

    accelerator, params = run.accelerator, run.params
    generator = torch.Generator(device=accelerator.device).manual_seed(1)
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator, device=p.device) * 1e-3)
    batch = next(run.batches)  # the first batch of the order: the same in every configuration
    noise = torch.Generator(accelerator.device).manual_seed(2)
    with accelerator.autocast():
        loss = flow_matching_loss(run.transformer, batch, run.schedule, noise)
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
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / ".bench" / "train_step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--flavours", nargs="+", default=list(REFERENCES), choices=list(REFERENCES))
    parser.add_argument("--modes", nargs="+", default=["baseline", "fast", "balanced", "low", "minimal"])
    parser.add_argument("--precision", nargs="+", default=["int8-quanto"])
    parser.add_argument("--budget-gib", type=float, default=0.0, help="memory budget the modes size to (0: free)")
    parser.add_argument("--cap-gib", type=float, default=0.0, help="refuse allocations beyond this (a smaller card)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="override compile")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts; > 1 runs under accelerate launch")
    parser.add_argument("--resolution", type=int, default=1024, help="target and reference side, pixels")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target", default="attention")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument("--grads-dir", type=Path, help="save each configuration's gradients here and compare")
    parser.add_argument("--json", type=Path, help="append every row to this JSON-lines file")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON", help="config keys, as a user sets them")
    parser.add_argument("--profile", type=Path, help="profile one more step; write its top kernels here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "flavour,precision,mode" in this process
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)  # internal: the flavour's config.json
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

    from train.cli import use_expandable_segments

    rows = []
    configs = {flavour: prepare(args, flavour) for flavour in args.flavours}
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--one")]
    for flavour, precision, mode, gpus in itertools.product(args.flavours, args.precision, args.modes, args.gpus):
        launcher = [sys.executable]
        if gpus > 1:
            launcher += ["-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
        one = ["--one", f"{flavour},{precision},{mode}", "--config", str(configs[flavour])]
        shutil.rmtree(args.work / "runs" / one[1].replace(",", "-"), ignore_errors=True)  # once, before any rank
        command = launcher + [__file__, *passthrough, *one]
        use_expandable_segments()  # as `train run` sets it, before its child starts CUDA
        env = dict(os.environ)
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
    keys = ["flavour", "precision", "mode", "plan", "GPUs", "tokens", "s/step", "samples/s", "TFLOP/s", "MFU"]
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
