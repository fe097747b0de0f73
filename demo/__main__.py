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

from demo.project import write_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(".demo"))
    parser.add_argument("--samples", type=int, help="edit pairs per flavour (default: demo.project.SAMPLES)")
    args = parser.parse_args()
    write_demo(args.root, args.samples)


if __name__ == "__main__":
    main()
