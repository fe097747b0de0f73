"""How prep and the training loader grow with the dataset: 10k and 100k pairs, and a 1M-row manifest.

    python bench/scale.py                                  # 10k and 100k pairs, then a 1M-row manifest
    python bench/scale.py --pairs 2000 --manifest-rows 50000 --workdir /tmp/scale   # quicker

Per dataset size N (small edit pairs: 64x64 PNGs, one reference, a caption file each):

- validate, cold: every image decoded (what the first build pays);
- the cache is then filled as a finished build leaves it: the product's own preparation (decode,
  place, VL processor, in `--workers` DataLoader workers), records (`to_record`), `ShardWriter`,
  `commit` and validation records, with small random tensors in place of encoder outputs
  (encoding 100k samples is a GPU job and is not what grows here);
- validate, warm: one `stat` per file, no decode; plan: what to reuse and encode;
- no-change rebuild: `prep build-cache` end to end, which must say "up to date";
- `prep verify`, full (every shard hashed, every tar header walked) and `--quick` (sizes);
- manifest load and loader start, in a fresh process: seconds, resident memory per process and
  per DataLoader worker (unique pages: what the worker does not share with its parent).

The 1M-row manifest is synthetic: a million distinct rows whose byte spans point at the records
of one small real shard (so batches really load and verify), loaded the way training loads it.
Ratios 100k/10k show how each cost grows (10 = linear).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def private_bytes(pid: int) -> int:
    """Pages only this process holds (not shared with its parent after fork): its real cost."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[-1] == "kB"}
    return fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def make_dataset(root: Path, n: int) -> None:
    """`n` pairs of 64x64 PNGs (edit + reference) and a caption each."""
    from PIL import Image

    for sub in ("images", "reference"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"{i // 1000:03d}/pair_{i:07d}"  # 1000 per folder, as large datasets are laid out
        for sub, shade in (("images", 40), ("reference", 200)):
            path = root / sub / f"{name}.png"
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", (64, 64), (i % 256, shade, (i // 256) % 256)).save(path, compress_level=1)
        (root / "images" / f"{name}.txt").write_text(f"recolour shape {i}\n")


def write_project(root: Path, model: Path, data: Path) -> Path:
    backend = [
        {
            "id": "pairs",
            "instance_data_dir": str(data / "images"),
            "caption_strategy": "textfile",
            "resolution": 64,
            "conditioning_data": ["ref"],
            "cache_dir_vae": str(root / "cache"),
        },
        {"id": "ref", "dataset_type": "conditioning", "instance_data_dir": str(data / "reference"), "resolution": 64},
    ]
    config = {
        "model_family": "qwen_image",
        "model_flavour": "edit-v1",
        "pretrained_model_name_or_path": str(model),
        "data_backend_config": str(root / "multidatabackend.json"),
        "output_dir": str(root / "output"),
    }
    (root / "multidatabackend.json").write_text(json.dumps(backend))
    (root / "config.json").write_text(json.dumps(config))
    return root / "config.json"


def fill_cache(config, report, workers: int) -> float:
    """Write every sample's record as a finished build would: the product's own preparation (decode,
    place, processor), records (`to_record`), shard writer and commit; only the encoders' outputs are
    small random tensors of the shapes the encoders would return (encoding is a GPU job and is not what
    grows here). Preparation runs in `workers` DataLoader workers, as in `prep build-cache`."""
    import torch
    from torch.utils.data import DataLoader

    from prep.build import FLAVOURS, cache_info, references_alone, save_validation
    from prep.encode_workers import PreparedSamples, unpack
    from prep.plan import plan_cache
    from prep.sample_records import SamplePreparer, to_record
    from shared.cache import DROPOUT
    from shared.cache.writer import ShardWriter, attach_dropout, commit
    from shared.models import load_processor

    start = time.perf_counter()
    main = config.main_datasets()[0]
    flavour = FLAVOURS[config.train.model_flavour]
    plan = plan_cache(config, main, report.samples[main.id], report.files, torch.float32, force=False)
    preparer = SamplePreparer(
        flavour,
        load_processor(config.train.pretrained_model_name_or_path),
        8,  # the VAE's scale factor
        config.train.match_target_res,
        config.train.crop_seed,
        config.train.preview_settings,
        references_alone(config, main),
        dropout=plan.dropout,
    )
    writer = ShardWriter(plan.folder, plan.fingerprint["sha256"], max_shard_bytes=256 << 20)
    dropout_writer = ShardWriter(plan.folder, plan.fingerprint["sha256"], max_shard_bytes=256 << 20, dropout=True)
    g = torch.Generator().manual_seed(0)
    samples = PreparedSamples(plan.encode, preparer, main, config.conditioning_for(main))
    for packed in DataLoader(samples, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None):
        prepared = unpack(packed)
        latents = [torch.randn(16, p.shape[-2] // 8, p.shape[-1] // 8, generator=g) for p in prepared.vae_pixels]
        embeds = [
            torch.randn(t["input_ids"].shape[1] - flavour.drop_tokens, 32, generator=g) for t in prepared.vl_texts
        ]
        members, row, dropout = to_record(prepared, latents, embeds)
        writer.write(prepared.sample.sample_id, members, row)
        if dropout is not None:
            dropout_writer.write(prepared.sample.sample_id, {DROPOUT: dropout[0]}, dropout[1])
    writer.finish_shard()
    dropout_writer.finish_shard()
    rows = sorted(writer.rows, key=lambda r: (r["relpath"], r["sample_id"]))
    attach_dropout(rows, dropout_writer.rows)
    shards = {**writer.shards, **dropout_writer.shards}
    commit(plan.folder, rows, shards, cache_info(plan, rows, flavour, shards))
    save_validation(plan, config, report)
    return time.perf_counter() - start


def measure_prep(workdir: Path, model: Path, n: int, warmup: Path, workers: int) -> dict:
    import torch

    from prep.build import build_cache
    from prep.plan import plan_cache
    from prep.validate import validate
    from shared.config import load_config

    root = workdir / f"pairs-{n}"
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    make_dataset(root / "data", n)
    made = time.perf_counter() - t
    config = load_config(write_project(root, model, root / "data"))
    main = config.main_datasets()[0]

    t = time.perf_counter()
    cold = validate(config)
    validate_cold = time.perf_counter() - t
    assert cold.trainable and cold.decoded == 2 * n, (cold.decoded, cold.render())
    filled = fill_cache(config, cold, workers)

    t = time.perf_counter()
    warm = validate(config)
    validate_warm = time.perf_counter() - t
    t = time.perf_counter()
    plan = plan_cache(config, main, warm.samples[main.id], warm.files, torch.float32, force=False)
    plan_s = time.perf_counter() - t
    assert plan.up_to_date, "a filled cache with nothing changed must be up to date"
    t = time.perf_counter()
    build_cache(config, device="cpu")
    rebuild = time.perf_counter() - t

    from prep.verify import verify_cache

    t = time.perf_counter()
    checked = verify_cache(config.cache_location_for(main))
    verify_s = time.perf_counter() - t
    assert checked.intact, checked.problems[:3]
    t = time.perf_counter()
    verify_cache(config.cache_location_for(main), quick=True)
    verify_quick_s = time.perf_counter() - t
    loader = run_loader_probe(Path(config.cache_location_for(main)), 2, warmup) if warmup else {}
    return {
        "pairs": n,
        "files": 2 * n,
        "make dataset s": made,
        "validate cold s (decodes)": validate_cold,
        "fill cache s": filled,
        "validate warm s": validate_warm,
        "warm decodes": warm.decoded,
        "plan s": plan_s,
        "no-change rebuild s": rebuild,
        "verify s": verify_s,
        "verify --quick s": verify_quick_s,
        **loader,
    }


def synthetic_manifest(workdir: Path, small_cache: Path, rows: int) -> Path:
    """A cache dir with the small cache's shards and a `rows`-row manifest whose spans point at them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shared.cache import CACHE_JSON, MANIFEST, MANIFEST_SCHEMA, SHARDS_DIR
    from shared.parquet import read_parquet

    target = workdir / f"manifest-{rows}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(small_cache / SHARDS_DIR, target / SHARDS_DIR)
    source = read_parquet(small_cache / MANIFEST)
    pick = np.arange(rows) % source.num_rows
    table = source.take(pa.array(pick))
    ids = [hashlib.sha1(str(i).encode()).hexdigest()[:20] for i in range(rows)]
    table = table.set_column(table.schema.get_field_index("sample_id"), "sample_id", pa.array(ids))
    relpaths = pa.array([f"{i // 1000:04d}/image_{i:07d}.png" for i in range(rows)])
    table = table.set_column(table.schema.get_field_index("relpath"), "relpath", relpaths)
    table = table.cast(MANIFEST_SCHEMA).replace_schema_metadata(source.schema.metadata)
    pq.write_table(table, target / MANIFEST)
    info = json.loads((small_cache / CACHE_JSON).read_text())
    info["counts"]["samples"] = info["counts"]["train"] = rows
    (target / CACHE_JSON).write_text(json.dumps(info))
    return target


def run_loader_probe(cache: Path, workers: int, warmup: Path) -> dict:
    """Manifest load and loader start in a fresh process (so its memory is its own), after loading the
    small cache `warmup` once so that one-time costs (lazy imports, kernel registries) are not counted."""
    command = [sys.executable, __file__, "--probe", str(cache), "--workers", str(workers), "--warmup", str(warmup)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def probe(cache: str, workers: int, warmup: str) -> dict:
    """(In a fresh process) load the manifest as training does, start the loader, take one batch."""
    import gc

    import pyarrow as pa

    from train.loader import CacheReader, TrainLoader

    next(iter(TrainLoader([CacheReader(warmup)], batch_size=1, seed=0)))  # one-time costs, then measure
    gc.collect()
    before = rss_bytes()
    t = time.perf_counter()
    reader = CacheReader(cache)
    load_s = time.perf_counter() - t
    pa.default_memory_pool().release_unused()
    gc.collect()
    after_load = rss_bytes()
    t = time.perf_counter()
    loader = TrainLoader([reader], batch_size=1, seed=0, workers=workers)
    order_s = time.perf_counter() - t
    iterator = iter(loader)
    t = time.perf_counter()
    next(iterator)
    first_batch_s = time.perf_counter() - t
    after_start = rss_bytes()
    # The DataLoader's worker processes: children of this process.
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    worker_private = [private_bytes(int(pid)) for pid in children]
    n = len(reader)
    return {
        "rows": n,
        "manifest load s": load_s,
        "order plan s": order_s,
        "first batch s": first_batch_s,
        "manifest bytes/row (process)": (after_load - before) / n,
        "process bytes/row after start": (after_start - before) / n,
        "worker private MiB (each)": [round(b / 2**20, 1) for b in worker_private],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--manifest-rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qet-scale"))
    parser.add_argument("--json", type=Path, help="append every result to this JSON-lines file")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.workers, args.warmup)))
        return

    from demo.tiny_model import write_tiny_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / "model"
    if not (model / "model_index.json").exists():
        write_tiny_model(model, "edit-v1")
    warmup = args.workdir / "warmup"  # a 20-pair cache every loader probe loads first
    if not (warmup / "cache").exists():
        measure_prep(args.workdir, model, 20, warmup=None, workers=args.workers)
        shutil.rmtree(warmup, ignore_errors=True)
        shutil.copytree(args.workdir / "pairs-20", warmup)
    warmup = warmup / "cache"
    results = []
    for n in args.pairs:
        results.append(measure_prep(args.workdir, model, n, warmup, args.workers))
        print(json.dumps(results[-1]), flush=True)
    if args.manifest_rows:
        small = args.workdir / f"pairs-{args.pairs[0]}" / "cache"
        big = synthetic_manifest(args.workdir, small, args.manifest_rows)
        results.append({"pairs": "synthetic manifest", **run_loader_probe(big, args.workers, warmup)})
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        with args.json.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    if len(args.pairs) >= 2:
        a, b = results[0], results[1]
        print(f"\nratios {b['pairs']}/{a['pairs']} (x{b['pairs'] / a['pairs']:.0f} the data):")
        for key, value in a.items():
            if isinstance(value, float) and value > 0:
                print(f"  {key}: {b[key] / value:.1f}")


if __name__ == "__main__":
    main()
