"""Decode an image file into the 8-bit RGB picture the encoders expect, saying what had to change.

Handled (and noted): EXIF orientation, transparency (flattened onto white), CMYK, 16-bit RGB and
grayscale (reduced to 8 bits), float images (scaled by their real range: [0, 1], [0, 255] or
[0, 65535]), animation (the first frame). Refused with a message that names the file: empty files,
files PIL cannot identify, truncated or corrupt data (never half-decoded), float images with values
outside those ranges or not finite, and images over a pixel-count limit (a guard against
decompression bombs).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import UserError

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own default bomb limit (~179 MP)
_EXIF_ORIENTATION = 0x0112


class ImageError(UserError):
    """An image that cannot be used; the message names the file and what to do."""


@dataclass
class DecodedImage:
    image: Image.Image  # 8-bit RGB, upright
    notes: list[str] = field(default_factory=list)  # what was converted, one phrase each

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Open `path` fully and return it upright as 8-bit RGB, with notes on every conversion.

    Raises `ImageError` for an empty, unidentifiable, truncated or oversized file.
    """
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes); re-export it or remove it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size  # from the header; nothing decoded yet
                if width * height > max_pixels:
                    raise ImageError(_too_big(path, f"{width}x{height} = {width * height:,} pixels", max_pixels))
                # PIL holds 16-bit RGB as 8-bit RGB: the file's raw mode says what it was
                raw_modes = [tile[3] if isinstance(tile[3], str) else tile[3][0] for tile in opened.tile if tile[3]]
                frames = getattr(opened, "n_frames", 1)
                opened.load()
                image = opened.copy()
                orientation = opened.getexif().get(_EXIF_ORIENTATION, 1)
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: {err}; downscale it, or remove it") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{path}: not an image this tool can read; re-export it as PNG or JPEG, or remove it"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: truncated or corrupt ({err}); re-export it or remove it") from None

    notes = []
    if frames > 1:
        notes.append(f"animated ({frames} frames): its first frame is used")
    if image.mode == "RGB" and any(";16" in str(mode) for mode in raw_modes):
        notes.append("16-bit RGB reduced to 8 bits per channel")
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
        notes.append(f"rotated upright (EXIF orientation {orientation})")
    image = _to_rgb8(image, notes, path)
    return DecodedImage(image, notes)


def load_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded 8-bit RGB picture of `path` (see `decode_image`)."""
    return decode_image(path, max_pixels).image


def _to_rgb8(image: Image.Image, notes: list[str], path: Path) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "F":
        return _float_to_rgb8(image, notes, path)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the full range down to 8 bits instead of clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        eight = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        notes.append(f"{'16' if top > 255 else '8'}-bit grayscale ({mode}) converted to 8-bit RGB")
        return Image.fromarray(eight, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"transparency ({mode}) flattened onto white")
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
    elif mode in ("L", "1"):
        notes.append(f"grayscale ({mode}) converted to RGB")
    elif mode != "P":
        notes.append(f"{mode} converted to RGB")
    return image.convert("RGB")


def _float_to_rgb8(image: Image.Image, notes: list[str], path: Path) -> Image.Image:
    """32-bit float grayscale, scaled by the range its values actually use; refused when that range is unclear."""
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ImageError(f"{path}: float image with NaN or infinite values; re-export it as 8- or 16-bit, or remove it")
    low, high = float(values.min()), float(values.max())
    # (lowest maximum believed, top, name): values up to 1.02 could be [0, 1] with highlights or a black [0, 255];
    # up to 1000 could be 12-bit, depth or HDR data. Those readings are guesses, so such images are refused.
    ranges = [(0.0, 1.0, "[0, 1]"), (2.0, 255.0, "[0, 255]"), (4096.0, 65535.0, "[0, 65535]")]
    top, named = next(((t, n) for least, t, n in ranges if least <= high <= t), (0.0, ""))
    if low < 0 or not top:
        raise ImageError(
            f"{path}: float image with values from {low:g} to {high:g}, which fit none of [0, 1], [0, 255] or "
            "[0, 65535] clearly, so its brightness is a guess; re-export it as 8- or 16-bit, or remove it"
        )
    notes.append(f"32-bit float grayscale (F, values in {named}) converted to 8-bit RGB")
    eight = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(eight, mode="L").convert("RGB")


def _too_big(path: Path, size: str, max_pixels: int) -> str:
    return (
        f"{path}: {size} is over the limit of {max_pixels:,} pixels "
        "(a guard against decompression bombs); downscale it, or raise max_image_pixels if you trust the file"
    )
