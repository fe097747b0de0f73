"""The stages' boundaries (DESIGN.md): `train` reads only the cache, so no module of train/ imports prep or an
image library (its PNGs and chart are drawn in shared/preview_grid.py and shared/plot.py); prep never imports
train; neither stage imports the demo package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "train": {"prep", "PIL", "matplotlib", "cv2", "imageio", "demo"},
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
    crossing = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[stage])
        for path in sorted((ROOT / stage).rglob("*.py"))
    }
    assert not {k: v for k, v in crossing.items() if v}
