"""`prep build-cache`: validate every dataset, then encode each sample into the cache.

Per sample: decode the edit image and its references, size them (bucket, crop), encode the
target latent, each reference latent and one VL embedding per caption, and write one record.
A cache is built in `<cache>.building/` and swapped in whole when complete, so the cache a
user already has stays readable until a new one is ready.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from prep.buckets import bucket_size, calculate_dimensions, crop_seed, plan_placement
from prep.encode import Encoders
from prep.images import load_rgb
from prep.scan import Sample
from prep.validate import validate
from prep.writer import ShardWriter
from shared.cache_format import (
    CACHE_JSON,
    FORMAT_VERSION,
    MANIFEST,
    embeds_to_bytes,
    latents_to_bytes,
    write_json_atomic,
    write_manifest,
)
from shared.config import Config, DatasetConfig
from shared.errors import UserError
from shared.flavours import FLAVOURS, Flavour


def reference_vae_size(
    flavour: Flavour, cond: DatasetConfig, ref_size: tuple[int, int], target_size: tuple[int, int], match_target: bool
) -> tuple[int, int]:
    """(width, height) the VAE encodes a reference at.

    edit-v1 strict: the target's bucket. edit-v2 with match_target_res: the target's size.
    Otherwise the reference is sized on its own at its dataset's resolution (1024 -> ~1 MP, as the
    pipelines do at inference).
    """
    strict = cond.conditioning_type == "reference_strict"
    if (flavour.name == "edit-v1" and strict) or (flavour.name == "edit-v2" and match_target):
        return target_size
    return bucket_size(ref_size[0], ref_size[1], cond.resolution, cond.resolution_type)


def encode_sample(
    sample: Sample, main: DatasetConfig, conds: list[DatasetConfig], encoders: Encoders, match_target: bool, seed: int
) -> tuple[dict[str, bytes], dict]:
    """Encode one sample; return its record members and its manifest columns."""
    flavour = encoders.flavour
    source = load_rgb(sample.image, main.max_image_pixels)
    placement = plan_placement(*source.size, main, seed, sample.sample_id)
    width, height = placement.size
    target_latent = encoders.encode_image(placement.apply(source), width, height)

    ref_latents, ref_sizes, ref_boxes, vl_images, ref_meta = [], [], [], [], []
    for cond, path in zip(conds, sample.references, strict=True):
        reference = load_rgb(path, cond.max_image_pixels)
        original = reference.size
        box = None
        if cond.conditioning_type == "reference_strict":
            # Exactly the target's resize and crop, so reference pixels line up with target pixels.
            reference = placement.apply(reference)
            box = list(placement.box)
        # A loose reference is not cropped: like the pipelines, it is resized to its own size below.
        vae_w, vae_h = reference_vae_size(flavour, cond, reference.size, (width, height), match_target)
        vl_w, vl_h = calculate_dimensions(flavour.vl_area, reference.width / reference.height)
        ref_latents.append(encoders.encode_image(reference, vae_w, vae_h))
        vl_images.append(encoders.resize(reference, vl_w, vl_h))
        ref_sizes.append([vae_h, vae_w])
        ref_boxes.append(box or [])
        ref_meta.append(
            {
                "dataset_id": cond.id,
                "conditioning_type": cond.conditioning_type,
                "original_size": list(original),
                "scaled_size": list(placement.scaled) if box else None,
                "crop_box": box,
                "vae_size": [vae_w, vae_h],
                "vl_size": [vl_w, vl_h],
                "sha256": _sha256(path),
            }
        )
    prompts = [encoders.encode_prompt(caption, vl_images) for caption in sample.captions]
    extra = {"negative": encoders.encode_prompt(" ", vl_images)} if sample.split == "eval" else {}

    hashes = [_sha256(p) for p in [sample.image, *sample.references]]
    source_sha = hashlib.sha256(json.dumps([hashes, sample.captions]).encode()).hexdigest()
    meta = {
        "sample_id": sample.sample_id,
        "dataset_id": sample.dataset_id,
        "relpath": sample.relpath,
        "split": sample.split,
        "captions": sample.captions,
        "target": {
            "original_size": list(source.size),
            "scaled_size": list(placement.scaled),
            "crop_box": list(placement.box),
            "size": [width, height],
            "sha256": hashes[0],
            "crop_style": main.crop_style if main.crop else "center",
            "crop_seed": crop_seed(seed, sample.sample_id, main.id),
        },
        "references": ref_meta,
        "source_sha256": source_sha,
    }
    members = {
        "latents.safetensors": latents_to_bytes(target_latent, ref_latents),
        "embeds.safetensors": embeds_to_bytes(prompts, extra),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode(),
    }
    row = {
        "dataset_id": sample.dataset_id,
        "relpath": sample.relpath,
        "split": sample.split,
        "height": height,
        "width": width,
        "original_size": list(source.size),
        "crop_box": list(placement.box),
        "ref_sizes": ref_sizes,
        "ref_crop_boxes": ref_boxes,
        "prompt_lens": [p.shape[0] for p in prompts],
        "captions": sample.captions,
        "source_sha256": source_sha,
    }
    return members, row


def fingerprint(config: Config, main: DatasetConfig, encoders: Encoders) -> dict:
    """Everything that changes the cached bytes, and its hash."""
    settings = {
        "format_version": FORMAT_VERSION,
        "model": config.train.pretrained_model_name_or_path,
        "vae_config": dict(encoders.vae.config),
        "text_encoder_config": encoders.text_encoder.config.to_dict(),
        "flavour": encoders.flavour.name,
        "prompt_template": encoders.flavour.vl_text("{}", len(main.conditioning_data)),
        "dtype": str(encoders.dtype),
        "match_target_res": config.train.match_target_res,
        "seed": config.train.seed,
        "datasets": [
            {
                k: getattr(d, k)
                for k in (
                    "id",
                    "resolution",
                    "resolution_type",
                    "conditioning_type",
                    "crop",
                    "crop_style",
                    "crop_aspect",
                )
            }
            for d in [main, *config.conditioning_for(main)]
        ],
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return {"sha256": digest, "settings": settings}


def build_cache(
    config: Config, device: str = "cpu", dtype: str = "auto", max_shard_bytes: int = 1_000_000_000
) -> list[Path]:
    """Validate, then encode every main dataset of `config` into its cache dir; return the cache dirs.

    `dtype` is the encoders' compute precision: "auto" is bf16 on a GPU (as inference runs) and
    fp32 on CPU (bf16 convolutions are ~5x slower there); the cache stores bf16 either way.
    """
    flavour = FLAVOURS[config.train.model_flavour]
    mains = config.main_datasets()
    report = validate(config)
    if not report.trainable:
        raise UserError(f"{report.render()}\nNothing was encoded.")
    print(f"validated: {sum(len(v) for v in report.samples.values())} samples, {len(report.warnings)} warning(s)")

    torch_dtype = encoder_dtype(dtype, device)
    print(f"loading encoders from {config.train.pretrained_model_name_or_path} on {device} ({torch_dtype})")
    encoders = Encoders(config.train.pretrained_model_name_or_path, flavour, device=device, dtype=torch_dtype)
    cache_dirs = []
    for main in mains:
        samples = report.samples[main.id]
        conds = config.conditioning_for(main)
        cache_dir = config.cache_dir_for(main)
        staging = cache_dir.with_name(cache_dir.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        writer = ShardWriter(staging, max_shard_bytes=max_shard_bytes)
        start = time.perf_counter()
        for sample in tqdm(samples, desc=f"encoding {main.id}", unit="sample"):
            members, row = encode_sample(
                sample, main, conds, encoders, config.train.match_target_res, config.train.seed
            )
            writer.write(sample.sample_id, members, row)
        rows = writer.close()
        write_manifest(rows, staging / MANIFEST)
        total_bytes = sum(p.stat().st_size for p in (staging / "shards").glob("*.tar"))
        info = {
            "format_version": FORMAT_VERSION,
            "flavour": flavour.name,
            "dataset_id": main.id,
            "fingerprint": fingerprint(config, main, encoders),
            "counts": {
                "samples": len(rows),
                "train": sum(r["split"] == "train" for r in rows),
                "eval": sum(r["split"] == "eval" for r in rows),
                "shard_bytes": total_bytes,
            },
            "latent_channels": encoders.vae.config.z_dim,
            "vae_scale_factor": encoders.scale,
            "text_dim": encoders.text_dim,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(staging / CACHE_JSON, info)
        _swap_in(staging, cache_dir)
        seconds = time.perf_counter() - start
        print(
            f"cache {cache_dir}: {len(rows)} samples, {total_bytes / max(len(rows), 1) / 1024:.1f} KiB/sample, "
            f"{seconds:.1f} s"
        )
        cache_dirs.append(cache_dir)
    return cache_dirs


def _swap_in(staging: Path, cache_dir: Path) -> None:
    """Replace `cache_dir` by the finished `staging` dir (the old cache stays whole until then)."""
    old = cache_dir.with_name(cache_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if cache_dir.exists():
        cache_dir.rename(old)
    staging.rename(cache_dir)
    shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encoder_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    if name not in dtypes:
        raise UserError(f"--dtype {name!r}: use auto, bf16, fp16 or fp32")
    return dtypes[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
