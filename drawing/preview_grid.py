"""Preview images as PNGs: one row per eval sample (references | output | ground truth, the instruction
under it), one grid of rows per preview step, and the before/after grid (the base model's output next to
the last step's). Drawn with PIL here, outside train/, so `train` itself never imports an image library (which keeps
"train reads only the cache" easy to check: tests/test_boundaries.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 8  # pixels between panels and rows
GRID_PANEL_HEIGHT = 384  # panels are scaled to this height in the step grid (the per-sample PNGs keep theirs)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def sample_row(panels: list[tuple[str, np.ndarray]], caption: str) -> np.ndarray:
    """Named [H, W, 3] uint8 panels (e.g. each reference, the output, the ground truth) side by side at the
    last panel's height, each under its name, with `caption` wrapped underneath; returns [H', W', 3] uint8."""
    height = panels[-1][1].shape[0]
    names = [name for name, _ in panels]
    images = [Image.fromarray(a) for _, a in panels]
    images = [p.resize((max(1, round(p.width * height / p.height)), height), Image.LANCZOS) for p in images]
    font = _font(max(12, height // 24))
    line = font.getbbox("Ag")[3] + 4
    width = sum(p.width for p in images) + GAP * (len(images) - 1)
    lines = textwrap.wrap(caption, width=max(20, width // max(1, line // 2))) or [""]
    canvas = Image.new("RGB", (width, line + height + GAP + line * len(lines)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, panel in zip(names, images, strict=True):
        draw.text((x + 2, 2), name, fill="black", font=font)
        canvas.paste(panel, (x, line))
        x += panel.width + GAP
    for i, text in enumerate(lines):
        draw.text((2, line + height + GAP + i * line), text, fill="black", font=font)
    return np.asarray(canvas)


def step_grid(rows: list[np.ndarray], title: str) -> np.ndarray:
    """The rows of one preview step stacked under a title, each scaled to `GRID_PANEL_HEIGHT`-ish; [H, W, 3]."""
    images = [Image.fromarray(r) for r in rows]
    scale = min(1.0, GRID_PANEL_HEIGHT * 1.4 / max(i.height for i in images))
    images = [
        i.resize((max(1, round(i.width * scale)), max(1, round(i.height * scale))), Image.LANCZOS) for i in images
    ]
    font = _font(18)
    top = font.getbbox("Ag")[3] + 8
    canvas = Image.new("RGB", (max(i.width for i in images), top + sum(i.height + GAP for i in images)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black", font=font)
    y = top
    for image in images:
        canvas.paste(image, (0, y))
        y += image.height + GAP
    return np.asarray(canvas)


def read_png(path: Path) -> np.ndarray:
    """A PNG as [H, W, 3] uint8 RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def save_png(array: np.ndarray, path: Path) -> None:
    """Write [H, W, 3] uint8 as a PNG (under a temporary name, then renamed: never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)
