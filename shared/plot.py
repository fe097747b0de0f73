"""A loss curve as a PNG, drawn with PIL (kept here so `train` itself never imports an image library:
the rule that makes "train reads only the cache" easy to check)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw


def plot_losses(losses: list[float], path: Path, width: int = 800, height: int = 400) -> None:
    """A PNG line chart of the loss per step, with a moving average (drawn with PIL)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, width - 20, 20, height - 40
    finite = [x for x in losses if math.isfinite(x)]
    draw.rectangle([left, top, right, bottom], outline="black")
    if finite:
        low, high = min(finite), max(finite)
        high = high if high > low else low + 1e-6
        n = max(len(losses) - 1, 1)

        def xy(i: int, value: float) -> tuple[float, float]:
            return left + (right - left) * i / n, bottom - (bottom - top) * (value - low) / (high - low)

        raw = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
        if len(raw) > 1:
            draw.line(raw, fill=(170, 190, 230), width=1)
        window = max(1, len(losses) // 20)
        smooth = []
        for i in range(len(losses)):
            chunk = [v for v in losses[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
            if chunk:
                smooth.append(xy(i, sum(chunk) / len(chunk)))
        if len(smooth) > 1:
            draw.line(smooth, fill=(20, 60, 160), width=2)
        draw.text((5, top), f"{high:.4f}", fill="black")
        draw.text((5, bottom - 10), f"{low:.4f}", fill="black")
    draw.text((left, bottom + 10), "step 1", fill="black")
    draw.text((right - 80, bottom + 10), f"step {len(losses)}", fill="black")
    draw.text((width // 2 - 60, bottom + 22), "loss (moving average)", fill="black")
    image.save(path)
