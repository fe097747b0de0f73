"""The demo project: its tiny models and datasets on disk (`write_demo`), and its configs (configs/demo-*) with
their `.demo/` paths moved elsewhere (`demo_config`), so that the learning test runs `make demo`'s own setup.

The demo's transformer is wider than the tests' tiny one (4 heads of 32: 128 wide) so that its patch
outputs (2·2·16 = 64 numbers a token) are within reach of its width, and the demo configs train LoRAs on
its input and output projections too (`img_in`, `proj_out`): on a random base those maps are random, and
a LoRA on attention alone moved its previews' pixel error 25% in 150 steps. In edit-v2 and edit-v3 the
text encoder is blind to pictures, so what the edit needs from its two pictures (picture 1's layout,
picture 2's colour) reaches the transformer only through the reference latents, told apart by their order
alone: a preview that packs them in another order than training did is far off (`tests/demo/test_learning.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

from demo.data import write_demo_dataset
from demo.tiny_model import write_tiny_model

FLAVOURS = ("edit-v1", "edit-v2", "edit-v3")
MODEL_DIRS = {
    "edit-v1": "tiny-qwen-image-edit",
    "edit-v2": "tiny-qwen-image-edit-2509",
    "edit-v3": "tiny-qwen-image-edit-2511",
}
# The demo models' settings (demo/tiny_model.py): a transformer 128 wide (4 heads of 32); with two
# references, a text encoder blind to pictures, so which picture is which can be read only from the
# references' order, and the vision tower reads 28-pixel patches, so a picture is a quarter of the real model's
# tokens (their prompts, and so each step on CPU, half as long). edit-v1 keeps 14: its one-picture prompts are
# short, and with 28 its previews on a GPU ended at half the base error, not 0.43 of it. Kept beside each model
# as demo_model.json: a `.demo/` written with others is rewritten.
DEMO_MODELS = {
    "edit-v1": {"heads": 4, "head_dim": 32, "blind_text_encoder": False},
    "edit-v2": {"heads": 4, "head_dim": 32, "blind_text_encoder": True, "vision_patch": 28},
    "edit-v3": {"heads": 4, "head_dim": 32, "blind_text_encoder": True, "vision_patch": 28},
}
SAMPLES = {"edit-v1": 48, "edit-v2": 96, "edit-v3": 96}  # edit pairs; eval_holdout of them (2, 4, 4) held out
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_demo(root: Path, n_samples: int | None = None, flavours: tuple[str, ...] = FLAVOURS) -> None:
    """The tiny models (kept when already written with their `DEMO_MODELS` settings) and datasets under `root`
    (`n_samples` pairs each, else `SAMPLES`)."""
    for flavour in flavours:
        model_dir = root / "models" / MODEL_DIRS[flavour]
        marker, settings = model_dir / "demo_model.json", DEMO_MODELS[flavour]
        if not (model_dir / "model_index.json").is_file() or not _holds(marker, settings):
            write_tiny_model(model_dir, flavour, reconstructing_vae=True, **settings)
            marker.write_text(json.dumps(settings))
        print(f"tiny {flavour} model: {model_dir}")
        n_refs = 1 if flavour == "edit-v1" else 2
        n = n_samples or SAMPLES[flavour]
        data = write_demo_dataset(root / "data" / flavour, n_samples=n, n_references=n_refs)
        print(f"demo {flavour} dataset: {data} ({n} pairs)")


def _holds(path: Path, settings: dict) -> bool:
    return path.is_file() and json.loads(path.read_text()) == settings


def demo_config(flavour: str, root: Path, **train: object) -> Path:
    """configs/demo-<flavour> with its `.demo/` paths under `root` (and `train` keys set): written to `root`."""

    def moved(value):
        if isinstance(value, str):
            return value.replace(".demo/", f"{root}/").replace(f"configs/demo-{flavour}/", f"{root}/")
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        return value

    source = CONFIGS / f"demo-{flavour}"
    backend = moved(json.loads((source / "multidatabackend.json").read_text()))
    config = moved(json.loads((source / "config.json").read_text())) | train
    root.mkdir(parents=True, exist_ok=True)
    (root / "multidatabackend.json").write_text(json.dumps(backend, indent=1))
    path = root / "config.json"
    path.write_text(json.dumps(config, indent=1))
    return path
