"""`prep build-cache` with the local engine against `--engine ray`, on one machine, through the command line.

    python bench/prep_engines.py                                  # real size, every GPU of this machine
    python bench/prep_engines.py --size tiny --pairs 8 --device cpu   # the same path anywhere

Both engines build the same cache (same random checkpoint and edit pairs as bench/product.py, written
to disk once) into a fresh cache folder each: the local engine as `prep build-cache` (under `torchrun
--nproc_per_node N` for N GPUs), Ray as `prep build-cache --engine ray` (one process; a local Ray with
one encoding actor per GPU). Reports each build's wall seconds and its encoding rate (the command's
own "rank r: n samples in s s" lines: all samples over the slowest rank), and Ray's rate against the
local engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from product import write_config, write_dataset, write_model  # noqa: E402 - the product bench's model and data

ENCODERS_LINE = re.compile(r"^ray: .*busy.*$", re.M)  # Ray's own account of how busy its actors were
RANK_LINE = re.compile(r"rank (\d+): (\d+) samples in ([\d.]+) s \([\d.]+ samples/s, steady ([\d.]+)\)")


def build(config: Path, engine: str, gpus: int, device: str) -> dict:
    """One `prep build-cache` into a fresh cache; its wall time and encoding rate."""
    settings = json.loads(config.read_text())
    backend = json.loads(Path(settings["data_backend_config"]).read_text())
    cache = Path(backend[0]["cache_dir_vae"]).with_name(f"cache-{engine}")
    shutil.rmtree(cache, ignore_errors=True)  # every build encodes every sample
    backend[0]["cache_dir_vae"] = str(cache)
    backend_path = config.with_name(f"multidatabackend-{engine}.json")
    backend_path.write_text(json.dumps(backend))
    settings["data_backend_config"] = str(backend_path)
    engine_config = config.with_name(f"config-{engine}.json")
    engine_config.write_text(json.dumps(settings))
    prep = ["-m", "prep.cli", "build-cache", "--config", str(engine_config), "--device", device]
    if engine == "ray":
        command = [sys.executable, *prep, "--engine", "ray"]
    elif gpus > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), *prep]
    else:
        command = [sys.executable, *prep]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"engine": engine, "rc": result.returncode, "error": (result.stdout + result.stderr)[-2000:]}
    ranks = [(int(n), float(s), float(steady)) for _, n, s, steady in RANK_LINE.findall(result.stdout)]
    samples = sum(n for n, _, _ in ranks)
    encoders = ENCODERS_LINE.search(result.stdout)
    return {
        "engine": engine,
        "rc": 0,
        "wall s": round(wall, 1),
        "samples": samples,
        "encoding samples/s": round(samples / max(s for _, s, _ in ranks), 3),
        # after the first quarter of each rank's samples: Ray's actors load the models inside its timed
        # loop, the local engine before it, so only this rate compares the engines' encoding
        "steady samples/s": round(sum(steady for _, _, steady in ranks), 3),
        **({"encoders": encoders.group(0)} if encoders else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--flavour", choices=["edit-v1", "edit-v2"], default="edit-v1")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "prep-engines")
    parser.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    model = write_model(args.work / f"model-{args.size}", args.size)
    n_refs = 1 if args.flavour == "edit-v1" else 3
    data = write_dataset(args.work / f"data-{n_refs}ref-{args.resolution}", args.pairs, n_refs, args.resolution)
    # The product bench's config (its train keys do not matter to prep); argparse-like fields it reads.
    fields = argparse.Namespace(resolution=args.resolution, steps=2, preview_steps=1, set=[])
    config = write_config(args.work, f"{args.flavour}:card", model, data, n_refs, fields)
    rows = [build(config, engine, gpus, args.device) for engine in args.engines]
    for row in rows:
        print(json.dumps(row), flush=True)
    rates = {row["engine"]: row.get("steady samples/s") for row in rows}
    if rates.get("local") and rates.get("ray"):
        encoders = f"{max(gpus, 1)} {'GPU' if gpus else 'CPU'} encoder(s)"
        print(f"ray / local, steady: {rates['ray'] / rates['local']:.3f} ({encoders})")


if __name__ == "__main__":
    main()
