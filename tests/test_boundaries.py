"""The stages' boundaries (DESIGN.md): `train` reads only the cache, so no module of train/ imports prep, and
only train/drawing/ (its PNG grids and loss chart: outputs, never a training image) imports an image library;
prep never imports train; neither stage imports the demo package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE_LIBRARIES = {"PIL", "matplotlib", "cv2", "imageio"}
DRAWING = "train/drawing"  # the one folder of train/ that draws
FORBIDDEN = {
    "train": {"prep", "demo"} | IMAGE_LIBRARIES,
    "prep": {"train", "demo"},
    "shared": {"prep", "train", "demo"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every import in `path`, wherever in the module it is written."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_no_module_crosses_its_stages_boundary(stage):
    crossing = {}
    for path in sorted((ROOT / stage).rglob("*.py")):
        name = str(path.relative_to(ROOT))
        forbidden = FORBIDDEN[stage] - (IMAGE_LIBRARIES if name.startswith(DRAWING + "/") else set())
        crossing[name] = sorted(imported_packages(path) & forbidden)
    assert not {k: v for k, v in crossing.items() if v}
