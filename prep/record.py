"""One sample -> one cache record: decode, place (bucket, crop), encode, serialise.

The sizes follow the pipelines: the target at its bucket; a strict reference with exactly the
target's placement; the VL encoder sees each reference at the flavour's VL area; the VAE sees
each reference at the size `reference_vae_size` gives.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prep.buckets import bucket_size, calculate_dimensions, crop_seed, plan_placement
from prep.encode import Encoders
from prep.images import load_rgb
from prep.scan import Sample
from shared.cache_format import embeds_to_bytes, latents_to_bytes
from shared.config import DatasetConfig
from shared.flavours import Flavour


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
                "sha256": file_sha256(path),
            }
        )
    prompts = [encoders.encode_prompt(caption, vl_images) for caption in sample.captions]
    extra = {"negative": encoders.encode_prompt(" ", vl_images)} if sample.split == "eval" else {}

    hashes = [file_sha256(p) for p in [sample.image, *sample.references]]
    source_sha = source_sha256(sample, hashes)
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


def source_sha256(sample: Sample, file_hashes: list[str] | None = None) -> str:
    """Hash of everything a record is made from: the image, its references, its captions and split."""
    hashes = file_hashes or [file_sha256(p) for p in [sample.image, *sample.references]]
    return hashlib.sha256(json.dumps([hashes, sample.captions, sample.split]).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
