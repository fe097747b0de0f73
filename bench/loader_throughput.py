"""Training-loader throughput: `train.loader.TrainLoader` over a local cache of real-size records.

    python bench/loader_throughput.py                       # 128 edit-v1 1024² samples, 0/2/4 workers
    python bench/loader_throughput.py --samples 512 --workers 0 2 4 8 --batch-size 2

Writes a cache in the real format (prep's shard writer and manifest) whose records have the
shapes of edit-v1 at 1024² (three aspect buckets: target and reference latents [16, 128, 128]
and so on; one Qwen2.5-VL embedding [~1400, 3584] and a dropout record, as prep writes them), then
reads it with 0, 2 and 4 DataLoader workers and prints samples/s and MB/s after the first batch
(start-up reported apart), caption dropout on. Every read is a ranged read by the manifest's offsets
(two per sample: its record, its dropout record), checked against
the manifest's sha256 and decoded with safetensors: the full per-sample cost training pays. The
files were just written, so they are read from the page cache: this measures the loader, not the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from shared.cache import DROPOUT, EMBEDS, FORMAT_VERSION, LATENTS, META, CacheFolder, Embeddings, Latents
from shared.cache.writer import ShardWriter, attach_dropout, commit
from train.loader import CacheReader, TrainLoader

BUCKETS = [(1024, 1024), (1184, 896), (896, 1184)]  # (height, width) pixels; latents are 1/8 per side
TEXT_DIM = 3584


def write_cache(cache_dir: Path, n: int, seed: int = 0) -> int:
    """A cache of `n` edit-v1-sized records; returns its shard bytes."""
    generator = torch.Generator().manual_seed(seed)
    folder = CacheFolder(cache_dir)
    writer = ShardWriter(folder, fingerprint="bench")
    dropout_writer = ShardWriter(folder, fingerprint="bench", dropout=True)  # caption dropout on, as by default
    for i in range(n):
        height, width = BUCKETS[i % len(BUCKETS)]
        target = torch.randn(16, height // 8, width // 8, generator=generator).to(torch.bfloat16)
        reference = torch.randn(16, height // 8, width // 8, generator=generator).to(torch.bfloat16)
        tokens = 1300 + i % 200  # image tokens of a ~1 MP reference plus the instruction
        prompt = torch.randn(tokens, TEXT_DIM, generator=generator).to(torch.bfloat16)
        empty = torch.cat([prompt[:1290], torch.randn(6, TEXT_DIM, generator=generator).to(torch.bfloat16)])
        embeds, _, dropout = Embeddings([prompt], dropout=empty).stored()  # as prep stores them
        members = {
            LATENTS: Latents(target, [reference]).to_bytes(),
            EMBEDS: embeds,
            META: json.dumps({"sample": i}).encode(),
        }
        row = {
            "dataset_id": "bench",
            "relpath": f"{i:06d}.jpg",
            "split": "train",
            "height": height,
            "width": width,
            "original_size": [width, height],
            "crop_box": [0, 0, width, height],
            "ref_sizes": [[height, width]],
            "ref_crop_boxes": [[0, 0, width, height]],
            "prompt_lens": [tokens],
            "captions": [f"caption {i}"],
            "source_sha256": hashlib.sha256(str(i).encode()).hexdigest(),
        }
        writer.write(f"{i:020x}", members, row)
        embeds_sha256 = hashlib.sha256(embeds).digest()
        dropout_writer.write(
            f"{i:020x}", {DROPOUT: dropout}, dict(source_sha256=row["source_sha256"], embeds_sha256=embeds_sha256)
        )
    writer.finish_shard()
    dropout_writer.finish_shard()
    attach_dropout(writer.rows, dropout_writer.rows)
    shards = {**writer.shards, **dropout_writer.shards}
    shard_bytes = sum(p.stat().st_size for p in (cache_dir / "shards").glob("*.tar"))
    info = {
        "format_version": FORMAT_VERSION,
        "flavour": "edit-v1",
        "dataset_id": "bench",
        "fingerprint": {"sha256": "bench"},
        "counts": {"samples": n, "train": n, "eval": 0, "shards": len(shards), "shard_bytes": shard_bytes},
    }
    commit(folder, writer.rows, shards, info)
    return shard_bytes


def measure(cache_dir: Path, workers: int, batch_size: int, batches: int) -> dict:
    reader = CacheReader(str(cache_dir), dropout=True)
    sizes = {
        reader.row(i).sample_id: int(
            reader.spans[LATENTS][1][i] + reader.spans[EMBEDS][1][i] + reader.dropout_span[1][i]
        )
        for i in range(len(reader))
    }
    loader = TrainLoader([reader], batch_size, seed=0, workers=workers, prefetch=2, caption_dropout=0.1)
    stream = iter(loader)
    t0 = time.perf_counter()
    next(stream)  # start-up: worker processes, first reads
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = nbytes = 0
    for _ in range(batches - 1):
        batch = next(stream)
        samples += len(batch.sample_ids)
        nbytes += sum(sizes[i] for i in batch.sample_ids)
    seconds = time.perf_counter() - t0
    return {
        "workers": workers,
        "samples/s": samples / seconds,
        "MB/s": nbytes / seconds / 1e6,
        "start-up s": startup,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="write the cache here and keep it (default: a temporary dir)")
    args = parser.parse_args()
    cache_dir = args.keep or Path(tempfile.mkdtemp(prefix="loader-bench-"))
    t0 = time.perf_counter()
    shard_bytes = write_cache(cache_dir, args.samples)
    print(
        f"cache: {args.samples} samples, {shard_bytes / args.samples / 1024:.0f} KiB/sample, "
        f"written in {time.perf_counter() - t0:.1f} s; batch {args.batch_size}; {torch.get_num_threads()} threads"
    )
    batches = args.samples // args.batch_size  # about one epoch
    rows = [measure(cache_dir, w, args.batch_size, batches) for w in args.workers]
    print(" | ".join(rows[0]))
    for row in rows:
        print(" | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()))
    if not args.keep:
        shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
