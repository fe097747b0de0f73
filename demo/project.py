"""The demo project: its tiny models and datasets on disk (`write_demo`), and its configs (configs/demo-*) with
their `.demo/` paths moved elsewhere (`demo_config`), so that the learning test runs `make demo`'s own setup.

The demo's transformer is wider than the tests' tiny one (4 heads of 32: 128 wide) so that its patch
outputs (2·2·16 = 64 numbers a token) are within reach of its width, and the demo configs train LoRAs on
its input and output projections too (`img_in`, `proj_out`): on a random base those maps are random, and
a LoRA on attention alone moved its previews' pixel error 25% in 150 steps. With them, 200 steps of the
toy recolouring task take the held-out previews from noise to the picture's colours (error ≤ 0.5x the
base model's; `tests/demo/test_learning.py`).
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
HEADS, HEAD_DIM = 4, 32  # the demo transformer's attention: 128 wide
SAMPLES = 48  # edit pairs per flavour: 46 to train on, 2 held out (eval_holdout)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_demo(root: Path, n_samples: int = SAMPLES, flavours: tuple[str, ...] = FLAVOURS) -> None:
    """The tiny models (kept when already written at the demo's width) and datasets under `root`."""
    for flavour in flavours:
        model_dir = root / "models" / MODEL_DIRS[flavour]
        if not _written_at_demo_width(model_dir):
            write_tiny_model(model_dir, flavour, reconstructing_vae=True, heads=HEADS, head_dim=HEAD_DIM)
        print(f"tiny {flavour} model: {model_dir}")
        n_refs = 1 if flavour == "edit-v1" else 2
        data = write_demo_dataset(root / "data" / flavour, n_samples=n_samples, n_references=n_refs)
        print(f"demo {flavour} dataset: {data} ({n_samples} pairs)")


def _written_at_demo_width(model_dir: Path) -> bool:
    config = model_dir / "transformer" / "config.json"
    if not (model_dir / "model_index.json").is_file() or not config.is_file():
        return False
    transformer = json.loads(config.read_text())
    return (transformer["num_attention_heads"], transformer["attention_head_dim"]) == (HEADS, HEAD_DIM)


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
