"""Generate a small dataset of real edit pairs on disk, in the layout users have.

```
<root>/images/<name>.png       the edited image (training target)
<root>/images/<name>.txt       the instruction
<root>/reference/<name>.png    the image before the edit (same relative path)
<root>/reference2/<name>.png   edit-v2 only: a colour swatch the instruction refers to
```
Each pair recolours one shape; images come in three aspect ratios.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 140, 30),
}
SIZES = [(256, 256), (320, 240), (240, 320)]  # (width, height)


def _draw(size: tuple[int, int], background: tuple, shape: str, box: tuple, colour: tuple) -> Image.Image:
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour, outline=(20, 20, 20), width=3)
    return image


def write_demo_dataset(root: str | Path, n_samples: int = 12, n_references: int = 1, seed: int = 0) -> Path:
    """Write `n_samples` edit pairs with `n_references` reference folders under `root`; return `root`."""
    rng = random.Random(seed)
    root = Path(root)
    folders = ["reference"] + [f"reference{i + 1}" for i in range(1, n_references)]
    for sub in ["images", *folders]:
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for index in range(n_samples):
        size = SIZES[index % len(SIZES)]
        background = tuple(rng.randint(150, 255) for _ in range(3))
        shape = rng.choice(["circle", "square"])
        w, h = size
        r = rng.randint(min(w, h) // 6, min(w, h) // 3)
        cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        before, after = rng.sample(names, 2)
        name = f"pair_{index:04d}.png"
        _draw(size, background, shape, box, COLOURS[before]).save(root / "reference" / name)
        _draw(size, background, shape, box, COLOURS[after]).save(root / "images" / name)
        if n_references == 1:
            caption = f"make the {shape} {after}"
        else:
            caption = f"paint the {shape} of picture 1 in the colour of picture 2"
            for folder in folders[1:]:
                Image.new("RGB", (128, 128), COLOURS[after]).save(root / folder / name)
        (root / "images" / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return root
