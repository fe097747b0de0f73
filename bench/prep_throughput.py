"""Cache-build throughput: the real `build_cache` path, at real model size with random weights.

    python bench/prep_throughput.py --size real --flavour edit-v1 edit-v2      # on a GPU
    python bench/prep_throughput.py --size tiny --device cpu --samples 8       # anywhere
    torchrun --nproc_per_node 2 bench/prep_throughput.py --size real           # one GPU per rank

For each flavour: generates edit pairs of ~1 MP photo-sized noise images (three aspect ratios,
interleaved), times the encoders alone on full batches of each shape (after a warm-up), then runs
the whole build (validation, DataLoader workers, batched encoders, shard writer) and reports
samples/s, the encoders' own seconds per sample, their ratio (pipeline efficiency: 1.0 = the
encoders never wait), the same after the first quarter of the samples (steady state: worker
start-up and warm-up excluded), GPU peak memory and cache bytes per sample. Then where the
encoders' time goes: per part (VAE, vision tower, language model) its seconds per sample (timed alone,
host-synced around each call), the TFLOP/s its counted FLOPs (torch.utils.flop_counter) make, and
their share of the card's dense bf16 peak, so the next lever is visible. Under torchrun every
rank encodes its share and rank 0 prints the total rate; efficiency is then per GPU.

`--size real` builds the Qwen-Image VAE and Qwen2.5-VL-7B with random weights directly on the
device; tokenizer and processor are the tiny default's (real special tokens and image preprocessing).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from demo.tiny_model import write_tiny_model
from prep.build import build_cache
from prep.distributed import Ranks, init_ranks
from prep.encode import Encoders, encode_prepared
from prep.sample_records import SamplePreparer
from prep.validate import validate
from shared.cache import needs_dropout
from shared.config import load_config
from shared.flavours import FLAVOURS
from shared.models import load_processor

SIZES = [(1024, 1024), (1184, 896), (896, 1184)]
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM (as bench/train_step.py)
# The encoders' three parts, by the `Encoders` method that runs each.
COMPONENTS = {"encode_pixels": "VAE", "encode_images": "vision tower", "encode_vl": "language model"}
WORDS = "make turn add remove the a red blue sky hat car into painting bigger left of picture 2 style".split()


def write_pairs(root: Path, n: int, n_refs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    folders = ["images", "reference"] + [f"reference{i + 1}" for i in range(1, n_refs)]
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = SIZES[i % len(SIZES)]
        # Smooth noise compresses like a photo (pure noise makes 3 MB JPEGs that no dataset has).
        small = np.random.default_rng(seed + i).integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        base = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        for folder in folders[1:]:
            base.rotate(rng.choice([0, 180])).save(root / folder / f"{i:05d}.jpg", quality=90)
        base.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "images" / f"{i:05d}.jpg", quality=90)
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
        (root / "images" / f"{i:05d}.txt").write_text(caption + "\n")


def real_modules(model_dir: Path, device: torch.device, write_configs: bool = True):
    """Qwen-Image's VAE and Qwen2.5-VL-7B, random weights, bf16, built on `device`; configs saved to `model_dir`."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor = load_processor(str(model_dir))
    token_id = processor.tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "max_position_embeddings": 128000,
            "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "window_size": 112,
            "tokens_per_second": 2,
            "hidden_act": "silu",
        },
        vocab_size=152064,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        vision_token_id=token_id("<|vision_pad|>"),
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            vae = AutoencoderKLQwenImage()  # diffusers' defaults are Qwen-Image's VAE
            text_encoder = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(default)
    if write_configs:  # configs only: the fingerprint reads them, weights stay in memory
        for sub in ("vae", "text_encoder"):
            shutil.rmtree(model_dir / sub)
        vae.save_config(model_dir / "vae")
        config.save_pretrained(model_dir / "text_encoder")
    return vae, text_encoder, processor


def run(args: argparse.Namespace, flavour: str, work: Path, modules, ranks: Ranks, device: torch.device) -> dict:
    n_refs = 1 if flavour == "edit-v1" else args.references
    data = work / f"data-{flavour}"
    if ranks.is_main:
        write_pairs(data, args.samples, n_refs)
    ranks.barrier()
    backend = [
        {
            "id": "edits",
            "instance_data_dir": str(data / "images"),
            "resolution": args.resolution,
            "conditioning_data": [f"ref{i}" for i in range(n_refs)],
            "cache_dir": str(work / f"cache-{flavour}"),
        }
    ]
    backend += [
        {
            "id": f"ref{i}",
            "dataset_type": "conditioning",
            "resolution": args.resolution,
            "instance_data_dir": str(data / ("reference" if i == 0 else f"reference{i + 1}")),
            "conditioning_type": "reference_strict" if i == 0 else "reference_loose",
        }
        for i in range(n_refs)
    ]
    model_dir = work / f"model-{args.size}"
    if ranks.is_main:
        (work / "db.json").write_text(json.dumps(backend))
        config_json = {
            "model_flavour": flavour,
            "pretrained_model_name_or_path": str(model_dir),
            "data_backend_config": str(work / "db.json"),
        }
        (work / "config.json").write_text(json.dumps(config_json))
    ranks.barrier()
    config = load_config(work / "config.json")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoders = Encoders(str(model_dir), FLAVOURS[flavour], device=str(device), dtype=dtype, modules=modules)

    # The encoders alone, on full batches of one shape prepared beforehand (the best they do):
    # once to warm up, then timed.
    main = config.main_datasets()[0]
    preview = {"negative_prompt": "", "resolution": 0}
    dropout = needs_dropout(config.train.caption_dropout_probability)  # as the build decides it
    preparer = SamplePreparer(FLAVOURS[flavour], encoders.processor, encoders.scale, False, 0, preview, dropout=dropout)
    groups: dict[tuple, list] = {}
    for sample in validate(config).samples[main.id][: len(SIZES) * args.batch_size]:
        prepared = preparer(sample, main, config.conditioning_for(main))
        groups.setdefault(prepared.batch_key, []).append(prepared)
    batches = [group[: args.batch_size] for group in groups.values()]
    with ComponentTimes(encoders, count_flops=True) as counted:  # also the warm-up
        for batch in batches:
            encode_prepared(batch, encoders, args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(2):
        for batch in batches:
            encode_prepared(batch, encoders, args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    encoder_s = (time.perf_counter() - t0) / (2 * sum(len(b) for b in batches))
    with ComponentTimes(encoders) as parts:  # each part alone, synced around every call: where the time goes
        for batch in batches:
            encode_prepared(batch, encoders, args.batch_size)
    n_prepared = sum(len(b) for b in batches)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
    components = {}
    for label, seconds in parts.seconds.items():
        tflops = counted.flops[label] / max(seconds, 1e-9) / 1e12
        components[f"{label} s/sample"] = seconds / n_prepared
        components[f"{label} TFLOP/s"] = tflops
        components[f"{label} of bf16 peak"] = tflops / peak

    stats = []
    t0 = time.perf_counter()
    (cache,) = build_cache(
        config,
        device=args.device,
        workers=args.workers,
        batch_size=args.batch_size,
        encoders=encoders,
        on_stats=stats.append,
    )
    total_s = time.perf_counter() - t0
    (s,) = stats
    info = json.loads((cache / "cache.json").read_text())
    # Several ranks: all samples over the slowest rank's time; efficiency per GPU.
    per_rank = ranks.gather((s.samples, s.seconds, s.steady_rate()))
    samples = sum(n for n, _, _ in per_rank)
    rate = samples / max(t for _, t, _ in per_rank)
    steady = sum(r for _, _, r in per_rank)
    return {
        "flavour": flavour,
        "refs": n_refs,
        "GPUs" if device.type == "cuda" else "ranks": ranks.world,
        "samples": samples,
        "samples/s": rate,
        "encoders s/sample": encoder_s,
        "efficiency": encoder_s * rate / ranks.world,
        "in-run encoders s/sample": s.encoder_seconds / s.samples,  # rank 0's
        "loader wait s/sample": s.wait_seconds / s.samples,
        "steady samples/s": steady,
        "steady efficiency": encoder_s * steady / ranks.world,
        "GPU peak GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "KiB/sample": info["counts"]["shard_bytes"] / samples / 1024,
        "validate+plan s": total_s - s.seconds,
        **components,
    }


class ComponentTimes:
    """While installed (`with`), each of the encoders' parts is timed per call between host syncs, and with
    `count_flops` its FLOPs are counted (torch.utils.flop_counter: matmuls, convolutions, attention)."""

    def __init__(self, encoders: Encoders, count_flops: bool = False):
        self.encoders, self.count_flops = encoders, count_flops
        self.seconds = dict.fromkeys(COMPONENTS.values(), 0.0)
        self.flops = dict.fromkeys(COMPONENTS.values(), 0)

    def __enter__(self) -> ComponentTimes:
        for method, label in COMPONENTS.items():
            setattr(self.encoders, method, self._timed(label, getattr(self.encoders, method)))
        return self

    def __exit__(self, *exc) -> None:
        for method in COMPONENTS:
            delattr(self.encoders, method)  # the class's method again

    def _timed(self, label: str, method):
        from torch.utils.flop_counter import FlopCounterMode

        cuda = self.encoders.device.type == "cuda"

        def timed(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            if self.count_flops:
                with FlopCounterMode(display=False) as counter:
                    out = method(*args, **kwargs)
                self.flops[label] += counter.get_total_flops()
            else:
                out = method(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            self.seconds[label] += time.perf_counter() - start
            return out

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--flavour", nargs="+", default=["edit-v1", "edit-v2"])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--references", type=int, default=3, help="references per edit-v2/v3 pair (edit-v1: 1)")
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary dir)")
    args = parser.parse_args()
    ranks, device_name = init_ranks(args.device)  # one process: no-op; under torchrun: this rank's GPU
    device = torch.device(device_name)
    work = ranks.broadcast(args.keep or Path(tempfile.mkdtemp(prefix="prep-bench-")))  # shared by all ranks
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if ranks.is_main:
        print(
            f"device: {ranks.world} x {name}; size {args.size}; {args.samples} samples at ~{args.resolution}²; "
            f"workers {args.workers}, batch {args.batch_size} per rank"
        )
        write_tiny_model(work / f"model-{args.size}", "edit-v1")
    ranks.barrier()
    modules = real_modules(work / f"model-{args.size}", device, ranks.is_main) if args.size == "real" else None
    ranks.barrier()
    rows = [run(args, flavour, work, modules, ranks, device) for flavour in args.flavour]
    keys = list(rows[0])
    if ranks.is_main:
        print(" | ".join(keys))
        for row in rows:
            print(" | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not args.keep and ranks.is_main:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
