"""Discover edit samples: pair each edit image with its references and read its captions.

A sample is the edit image at relative path P under the main dataset's `instance_data_dir`;
every conditioning dataset must hold a file at the same relative path P.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import Config, DatasetConfig

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class Sample:
    dataset_id: str
    relpath: str  # POSIX path relative to the main dataset's instance_data_dir
    image: Path
    references: list[Path]  # one per conditioning dataset, in conditioning_data order
    captions: list[str]
    caption_file: Path | None = None

    @property
    def sample_id(self) -> str:
        """Stable hex id (no dots, as webdataset keys need) from the dataset id and relative path."""
        return hashlib.sha1(f"{self.dataset_id}/{self.relpath}".encode()).hexdigest()[:20]


@dataclass
class ScanResult:
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line each: the file and what to do


def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the images under `root`, nested folders included, sorted."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def read_captions(main: DatasetConfig, image: Path) -> tuple[list[str], Path | None]:
    """The captions of one image by the dataset's `caption_strategy`, and the file they came from."""
    if main.caption_strategy == "instanceprompt":
        return [main.instance_prompt], None
    if main.caption_strategy == "filename":
        return [image.stem.replace("_", " ").strip()], None
    text_file = image.with_suffix(".txt")
    if not text_file.is_file():
        return [], text_file
    try:
        lines = text_file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        return [], text_file  # reported as a missing caption; the message names the file
    return [line.strip() for line in lines if line.strip()], text_file


def scan_dataset(config: Config, main: DatasetConfig) -> ScanResult:
    """Pair and caption every edit image of `main`; list every problem found, encode nothing."""
    result = ScanResult()
    main_root = Path(main.instance_data_dir)
    conds = config.conditioning_for(main)
    roots = [main_root] + [Path(c.instance_data_dir) for c in conds]
    for dataset, root in zip([main, *conds], roots, strict=True):
        if not root.is_dir():
            result.problems.append(f"{root}: folder of dataset '{dataset.id}' does not exist; fix instance_data_dir")
    if result.problems:
        return result

    images = list_images(main_root)
    if not images:
        result.problems.append(f"{main_root}: no images in dataset '{main.id}'; add images or fix instance_data_dir")
    per_cond = [set(list_images(Path(c.instance_data_dir))) for c in conds]
    for cond, have in zip(conds, per_cond, strict=True):
        for extra in sorted(have - set(images)):
            result.problems.append(
                f"{Path(cond.instance_data_dir) / extra}: reference with no edit image at "
                f"{main_root / extra}; add the edit image or remove the reference"
            )
    for relpath in images:
        missing = [
            Path(c.instance_data_dir) / relpath for c, have in zip(conds, per_cond, strict=True) if relpath not in have
        ]
        for path in missing:
            result.problems.append(
                f"{main_root / relpath}: no reference at {path}; add it (same relative path) or remove the edit image"
            )
        captions, caption_file = read_captions(main, main_root / relpath)
        if not captions:
            result.problems.append(
                f"{main_root / relpath}: no caption ({caption_file} is missing, empty or not UTF-8); "
                "write the instruction there"
            )
        if missing or not captions:
            continue
        references = [Path(c.instance_data_dir) / relpath for c in conds]
        result.samples.append(Sample(main.id, relpath, main_root / relpath, references, captions, caption_file))
    return result
