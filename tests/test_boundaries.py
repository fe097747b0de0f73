"""The stages' boundaries (DESIGN.md): `train` reads only the cache, so no module of train/ imports prep or an
image library (the PNG grids and loss.png it writes are drawn by drawing/, which imports neither stage);
prep never imports train; neither stage imports the demo package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "train": {"prep", "demo", "PIL", "matplotlib", "cv2", "imageio"},
    "prep": {"train", "demo"},
    "shared": {"prep", "train", "demo"},
    "drawing": {"prep", "train", "demo"},
}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports when it runs (`from a.b import c` counts a.b and a.b.c), wherever it is
    written, but for imports under `if TYPE_CHECKING:` (read by type checkers only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found = set()
    for node in (n for n in ast.walk(tree) if id(n) not in typing_only):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


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


def test_no_module_imports_itself_back_through_others():
    """The product's modules import in one direction: no cycle, even through an import inside a function."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in ("shared", "prep", "train", "drawing", "demo")
        for path in (ROOT / package).rglob("*.py")
    }
    graph = {name: sorted(imported_modules(path) & modules.keys() - {name}) for name, path in modules.items()}
    state: dict[str, str] = {}  # "open" while its imports are being followed, then "done"

    def cycle_from(name: str, trail: list[str]) -> list[str] | None:
        state[name] = "open"
        for other in graph[name]:
            if state.get(other) == "open":
                return [*trail, name, other]
            if other not in state and (found := cycle_from(other, [*trail, name])):
                return found
        state[name] = "done"
        return None

    for name in sorted(graph):
        assert name in state or not (cycle := cycle_from(name, [])), " -> ".join(cycle)
