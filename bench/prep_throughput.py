"""Cache-build throughput: the real `build_cache` path, at real model size with random weights.

    python bench/prep_throughput.py --size real --flavour edit-v1 edit-v2      # on a GPU
    python bench/prep_throughput.py --size tiny --device cpu --samples 8       # anywhere

For each flavour: generates edit pairs of ~1 MP photos-sized noise images (three aspect ratios),
times the encoders alone on a few prepared samples (after a warm-up), then runs the whole build
(validation, DataLoader workers, batched encoders, shard writer) and reports samples/s, the
encoders' own seconds per sample, their ratio (pipeline efficiency: 1.0 = the encoders never
wait), the same after the first quarter of the samples (steady state: worker start-up and
warm-up excluded), GPU peak memory and cache bytes per sample. `--size real` builds the Qwen-Image VAE and
Qwen2.5-VL-7B with random weights directly on the device; tokenizer and processor are the tiny
default's (real special tokens and image preprocessing).
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

from prep.build import build_cache
from prep.encode import Encoders
from prep.record import SamplePreparer, encode_prepared
from prep.validate import validate
from shared.config import load_config
from shared.flavours import FLAVOURS
from shared.models import load_processor
from shared.tiny_model import write_tiny_model

SIZES = [(1024, 1024), (1184, 896), (896, 1184)]
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


def real_modules(model_dir: Path, device: torch.device):
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
    for sub in ("vae", "text_encoder"):  # configs only: the fingerprint reads them, weights stay in memory
        shutil.rmtree(model_dir / sub)
    vae.save_config(model_dir / "vae")
    config.save_pretrained(model_dir / "text_encoder")
    return vae, text_encoder, processor


def run(args: argparse.Namespace, flavour: str, work: Path, modules) -> dict:
    device = torch.device(args.device)
    n_refs = 1 if flavour == "edit-v1" else 2
    data = work / f"data-{flavour}"
    write_pairs(data, args.samples, n_refs)
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
    (work / "db.json").write_text(json.dumps(backend))
    model_dir = work / f"model-{args.size}"
    (work / "config.json").write_text(
        json.dumps(
            {
                "model_flavour": flavour,
                "pretrained_model_name_or_path": str(model_dir),
                "data_backend_config": str(work / "db.json"),
            }
        )
    )
    config = load_config(work / "config.json")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoders = Encoders(str(model_dir), FLAVOURS[flavour], device=str(device), dtype=dtype, modules=modules)

    # The encoders alone, on samples prepared beforehand: once to warm up, once timed.
    main = config.main_datasets()[0]
    preparer = SamplePreparer(FLAVOURS[flavour], encoders.processor, encoders.scale, False, 0)
    samples = validate(config).samples[main.id][: args.batch_size * 2]
    prepared = [preparer(s, main, config.conditioning_for(main)) for s in samples]
    encode_prepared(prepared, encoders, args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(2):
        encode_prepared(prepared, encoders, args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    encoder_s = (time.perf_counter() - t0) / (2 * len(prepared))

    stats = []
    t0 = time.perf_counter()
    (cache,) = build_cache(
        config,
        device=str(device),
        workers=args.workers,
        batch_size=args.batch_size,
        encoders=encoders,
        on_stats=stats.append,
    )
    total_s = time.perf_counter() - t0
    (s,) = stats
    info = json.loads((cache / "cache.json").read_text())
    wall_per_sample = s.seconds / s.samples
    return {
        "flavour": flavour,
        "samples": s.samples,
        "samples/s": s.samples / s.seconds,
        "encoders s/sample": encoder_s,
        "efficiency": encoder_s / wall_per_sample,
        "steady samples/s": s.steady_rate(),
        "steady efficiency": encoder_s * s.steady_rate(),
        "GPU peak GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "KiB/sample": info["counts"]["shard_bytes"] / s.samples / 1024,
        "validate+plan s": total_s - s.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--flavour", nargs="+", default=["edit-v1", "edit-v2"])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="prep-bench-"))
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name}; size {args.size}; {args.samples} samples at ~{args.resolution}²; "
        f"workers {args.workers}, batch {args.batch_size}"
    )
    write_tiny_model(work / f"model-{args.size}", "edit-v1")
    modules = real_modules(work / f"model-{args.size}", device) if args.size == "real" else None
    rows = [run(args, flavour, work, modules) for flavour in args.flavour]
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
