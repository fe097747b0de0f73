"""Target sizes (aspect buckets) and crops.

A bucket keeps the image's aspect (or is square with `crop: true` and `crop_aspect: square`, SimpleTuner's
defaults once cropping is on) at an area set by
the dataset's `resolution`, with both sides multiples of 32 (VAE factor 8 x 2x2 packing x 2 for
the pipelines' rounding). An image reaches its bucket in two steps, recorded as a `Placement`:
scale it (Lanczos) to cover the bucket, then crop the bucket's window out of the scaled image,
centred or (`crop: true`, `crop_style: random`) at a seeded random offset. A `reference_strict`
reference gets exactly its target's placement: the same scaled size and the same crop box.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

from shared.config import DatasetConfig

ALIGN = 32


def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """(width, height) of about `target_area` pixels at `ratio` = width/height, sides multiples of 32.

    Identical to `calculate_dimensions` in diffusers' Qwen-Image-Edit pipelines.
    """
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / ALIGN) * ALIGN, round(height / ALIGN) * ALIGN


def _area(resolution: float, resolution_type: str, ratio: float) -> float:
    """Pixels of a bucket: `pixel_area` resolution², `area` resolution MP, `pixel` shorter edge = resolution."""
    if resolution_type == "pixel_area":
        return resolution * resolution
    if resolution_type == "area":
        return resolution * 1_000_000
    return resolution * resolution * (ratio if ratio >= 1 else 1 / ratio)


def bucket_size(
    width: int, height: int, resolution: float, resolution_type: str, square: bool = False
) -> tuple[int, int]:
    """The (width, height) bucket a `width` x `height` image trains at."""
    ratio = 1.0 if square else width / height
    w, h = calculate_dimensions(_area(resolution, resolution_type, ratio), ratio)
    return max(w, ALIGN), max(h, ALIGN)


def meets_minimum(width: int, height: int, minimum: float, resolution_type: str) -> bool:
    """`minimum_image_size` in the dataset's resolution units (edge of equal area, megapixels, shorter edge)."""
    if minimum <= 0:
        return True
    if resolution_type == "pixel_area":
        return math.sqrt(width * height) >= minimum
    if resolution_type == "area":
        return width * height / 1_000_000 >= minimum
    return min(width, height) >= minimum


@dataclass(frozen=True)
class Placement:
    """How an image becomes its training pixels: scale to `scaled`, then crop `box`."""

    size: tuple[int, int]  # (width, height) of the result: the bucket
    scaled: tuple[int, int]  # (width, height) the image is scaled to first
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in scaled pixels

    def apply(self, image: Image.Image) -> Image.Image:
        scaled = image if image.size == self.scaled else image.resize(self.scaled, resample=Image.Resampling.LANCZOS)
        return scaled.crop(self.box)


def plan_placement(width: int, height: int, dataset: DatasetConfig, seed: int, sample_id: str) -> Placement:
    """The placement of a `width` x `height` image of `dataset` (its target, or a loose reference)."""
    square = dataset.crop and dataset.crop_aspect == "square"  # without crop, crop_aspect means nothing (SimpleTuner)
    bucket = bucket_size(width, height, dataset.resolution, dataset.resolution_type, square)
    random_crop = dataset.crop and dataset.crop_style == "random"
    return place(width, height, bucket, random_crop=random_crop, seed=crop_seed(seed, sample_id, dataset.id))


def crop_seed(seed: int, sample_id: str, dataset_id: str) -> str:
    """The seed of one sample's random crop: the run's `seed` with the sample's identity."""
    return f"{seed}:{sample_id}:{dataset_id}"


def place(width: int, height: int, bucket: tuple[int, int], random_crop: bool = False, seed: str = "") -> Placement:
    """Scale a `width` x `height` image to cover `bucket`, then pick the crop window."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    sw, sh = max(bw, round(width * scale)), max(bh, round(height * scale))
    if random_crop:
        rng = random.Random(seed)
        left, top = rng.randint(0, sw - bw), rng.randint(0, sh - bh)
    else:
        left, top = (sw - bw) // 2, (sh - bh) // 2
    return Placement((bw, bh), (sw, sh), (left, top, left + bw, top + bh))
