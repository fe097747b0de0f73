"""Generate a small dataset of real edit pairs on disk, in the layout users have.

```
<root>/images/<name>.png       the edited image (training target)
<root>/images/<name>.txt       the instruction
<root>/reference/<name>.png    the image before the edit (same relative path)
<root>/reference2/<name>.png   edit-v2/v3: another picture, whose shape's colour the instruction asks for
```
Each pair recolours one shape; images come in three aspect ratios. With two references both are pictures
of the same kind (a shape on a plain background), so only their order says which one is edited: a model
that learns this edit reads its references by position, and a preview whose references were packed in
another order than training's is visibly wrong (the demo's learning test relies on that).
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


def _scene(rng: random.Random, size: tuple[int, int], darkest: int) -> tuple[tuple, str, tuple]:
    """A random plain background colour (each channel in [`darkest`, 255]), shape ("circle" or "square") and
    its box (x0, y0, x1, y1) in pixels."""
    w, h = size
    background = tuple(rng.randint(darkest, 255) for _ in range(3))
    shape = rng.choice(["circle", "square"])
    r = rng.randint(min(w, h) // 6, min(w, h) // 3)
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    return background, shape, (cx - r, cy - r, cx + r, cy + r)


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
    # With several pictures, backgrounds span every colour, so that reading the wrong picture is far off.
    darkest = 150 if n_references == 1 else 0
    for index in range(n_samples):
        size = SIZES[index % len(SIZES)]
        background, shape, box = _scene(rng, size, darkest)
        before, after, *others = rng.sample(list(COLOURS), 1 + n_references)
        name = f"pair_{index:04d}.png"
        _draw(size, background, shape, box, COLOURS[before]).save(root / "reference" / name)
        _draw(size, background, shape, box, COLOURS[after]).save(root / "images" / name)
        if n_references == 1:
            caption = f"make the {shape} {after}"
        else:
            # picture 2 shows the new colour on a shape of its own; any further picture is a distractor
            colours = [after, *others][: n_references - 1]  # one per picture after the first
            scenes = [_scene(rng, size, darkest) for _ in colours]
            for folder, colour, scene in zip(folders[1:], colours, scenes, strict=True):
                _draw(size, *scene, COLOURS[colour]).save(root / folder / name)
            caption = f"paint the {shape} of picture 1 in the colour of the {scenes[0][1]} in picture 2"
        (root / "images" / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return root
