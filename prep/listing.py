"""Listing a dataset folder: every image file under it, nested folders and symlinked ones included, and what
cannot be listed (broken links, link loops, links leading outside the folder, image formats not read).

Nothing here opens a file: `prep/scan.py` pairs and captions what this lists, `prep/validate.py` decodes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Image files this tool does not read: named in the report (never skipped without a word).
UNSUPPORTED_IMAGE_EXTENSIONS = {
    ".heic",
    ".heif",
    ".avif",
    ".jxl",
    ".jp2",
    ".svg",
    ".psd",
    ".ico",
    ".tga",
    ".exr",
    ".hdr",
    ".dng",
    ".raw",
    ".cr2",
    ".cr3",
    ".nef",
    ".arw",
    ".orf",
    ".rw2",
}


@dataclass
class Listing:
    """The images under one dataset root, and the links it could not follow."""

    images: list[str] = field(default_factory=list)  # relative POSIX paths, sorted
    loops: list[str] = field(default_factory=list)  # symlinked folders that lead back to a folder already listed
    broken: list[str] = field(default_factory=list)  # image names whose symlink points at nothing
    unsupported: list[str] = field(default_factory=list)  # image files of a format this tool does not read
    outside: list[str] = field(default_factory=list)  # links leading outside the root (not followed): name -> target
    targets: dict[str, str] = field(default_factory=dict)  # where each of `outside` leads


def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the images under `root`, nested folders included, sorted."""
    return walk_images(root).images


def outside(path: Path, root: Path) -> bool:
    """Whether `path`, its links resolved, lies outside `root` (also resolved)."""
    real, real_root = path.resolve(), root.resolve()
    return real != real_root and real_root not in real.parents


def walk_images(root: Path, allow_outside: bool = False) -> Listing:
    """Every image under `root`: one `scandir` per folder (no `stat` per regular file), symlinked folders
    followed, each real folder listed once (a link back to a folder already seen is a loop, reported).
    A link (folder or image) leading outside `root` is followed only with `allow_outside`."""
    listing = Listing()
    seen: set[tuple[int, int]] = set()

    def leads_outside(entry: os.DirEntry, name: str) -> bool:
        if allow_outside or not entry.is_symlink() or not outside(Path(entry.path), root):
            return False
        listing.outside.append(name)
        listing.targets[name] = str(Path(entry.path).resolve())
        return True

    def walk(folder: str, prefix: str) -> None:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            listing.loops.append(prefix.rstrip("/"))
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():  # follows symlinks
                    if not leads_outside(entry, prefix + entry.name):
                        walk(entry.path, f"{prefix}{entry.name}/")
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    if entry.is_file():
                        if not leads_outside(entry, prefix + entry.name):
                            listing.images.append(prefix + entry.name)
                    elif entry.is_symlink():
                        listing.broken.append(prefix + entry.name)
                elif os.path.splitext(entry.name)[1].lower() in UNSUPPORTED_IMAGE_EXTENSIONS:
                    listing.unsupported.append(prefix + entry.name)

    if root.is_dir():
        walk(str(root), "")
    listing.images.sort()
    return listing
