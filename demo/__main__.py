"""`python -m demo`: write the tiny offline default (models + datasets) that configs/demo-* use.

```
.demo/models/tiny-qwen-image-edit        edit-v1 layout (QwenImageEditPipeline)
.demo/models/tiny-qwen-image-edit-2509   edit-v2 layout (QwenImageEditPlusPipeline)
.demo/models/tiny-qwen-image-edit-2511   edit-v3 layout (QwenImageEditPlusPipeline, transformer zero_cond_t)
.demo/data/edit-v1/{images,reference}
.demo/data/edit-v2/{images,reference,reference2}, and the same for edit-v3
```
"""

from __future__ import annotations

import argparse
from pathlib import Path

from demo.data import write_demo_dataset
from demo.tiny_model import write_tiny_model

MODEL_DIRS = {
    "edit-v1": "tiny-qwen-image-edit",
    "edit-v2": "tiny-qwen-image-edit-2509",
    "edit-v3": "tiny-qwen-image-edit-2511",
}


def write_demo(root: Path, n_samples: int = 12) -> None:
    for flavour, name in MODEL_DIRS.items():
        model_dir = root / "models" / name
        if not (model_dir / "model_index.json").is_file():
            write_tiny_model(model_dir, flavour, reconstructing_vae=True)
        print(f"tiny {flavour} model: {model_dir}")
    for flavour, n_refs in (("edit-v1", 1), ("edit-v2", 2), ("edit-v3", 2)):
        data = write_demo_dataset(root / "data" / flavour, n_samples=n_samples, n_references=n_refs)
        print(f"demo {flavour} dataset: {data} ({n_samples} pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(".demo"))
    parser.add_argument("--samples", type=int, default=12)
    args = parser.parse_args()
    write_demo(args.root, args.samples)


if __name__ == "__main__":
    main()
