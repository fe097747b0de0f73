"""Target sizes (aspect buckets) and crops.

A bucket keeps the image's aspect at an area set by the dataset's `resolution`, with both
sides multiples of 32 (VAE factor 8 x 2x2 packing x 2 for the pipelines' rounding).
"""

from __future__ import annotations

import math

from PIL import Image

ALIGN = 32


def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """(width, height) of about `target_area` pixels at `ratio` = width/height, sides multiples of 32.

    Identical to `calculate_dimensions` in diffusers' Qwen-Image-Edit pipelines.
    """
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / ALIGN) * ALIGN, round(height / ALIGN) * ALIGN


def bucket_size(width: int, height: int, resolution: float, resolution_type: str) -> tuple[int, int]:
    """The (width, height) a `width` x `height` image trains at.

    `pixel_area`: area resolution²; `area`: resolution megapixels; `pixel`: shorter edge = resolution.
    """
    ratio = width / height
    if resolution_type == "pixel_area":
        area = resolution * resolution
    elif resolution_type == "area":
        area = resolution * 1_000_000
    else:
        short = resolution
        area = short * short * (ratio if ratio >= 1 else 1 / ratio)
    w, h = calculate_dimensions(area, ratio)
    return max(w, ALIGN), max(h, ALIGN)


def resize_and_center_crop(image: Image.Image, width: int, height: int) -> tuple[Image.Image, list[int]]:
    """Scale `image` to cover `width` x `height`, then crop the centre.

    Returns the (width x height) picture and the crop box [left, top, right, bottom] in the
    scaled image's pixels. A reference with the target's size and aspect gets the same box.
    """
    scale = max(width / image.width, height / image.height)
    scaled_w, scaled_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    scaled = image.resize((scaled_w, scaled_h), resample=Image.Resampling.LANCZOS)
    left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
    box = [left, top, left + width, top + height]
    return scaled.crop(box), box
