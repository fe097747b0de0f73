"""Decode an image file into the 8-bit RGB picture the encoders expect."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from shared.errors import UserError


def load_rgb(path: Path) -> Image.Image:
    """Open `path`, apply its EXIF orientation, flatten transparency onto white, return RGB.

    Raises `UserError` naming the file when it cannot be decoded (truncated, not an image).
    """
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: cannot read this image ({err}); replace or remove the file") from None
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")
