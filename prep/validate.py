"""`prep validate`: find every problem in the datasets before a single encoder is loaded.

Scans and pairs every dataset (`prep.scan`), then decodes every image once to catch unreadable,
truncated, oversized and undersized files, references whose aspect differs from their target
under `reference_strict`, and images so small that their bucket would blow them up more than 2x.
Files a previous build already validated and that have not changed since (same size, mtime and
inode: `prep.file_records`) are not decoded again. The result is one `Report`: counts first, then each problem with the
file it concerns and what to do. `build-cache` runs the same validation and stops if it fails.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prep.buckets import bucket_size, calculate_dimensions, meets_minimum, plan_placement
from prep.file_records import FileRecord, file_sha256, load_records, stat_record, unchanged
from prep.images import ImageError, decode_image
from prep.scan import Finding, Sample, ScanResult, scan_dataset
from prep.splits import hold_out
from shared.cache import CacheFolder
from shared.config import Config, DatasetConfig
from shared.flavours import FLAVOURS, Flavour

ASPECT_TOLERANCE = 0.01  # relative difference of width/height allowed between a strict reference and its target
MAX_UPSCALE = 2.0  # per side; beyond this an image trains on interpolated mush
MAX_VL_ASPECT = 200  # Qwen2.5-VL's image processor refuses images more elongated than this


@dataclass
class Report:
    config_path: str
    flavour: str
    datasets: list[ScanResult]
    findings: list[Finding]
    samples: dict[str, list[Sample]]  # trainable samples per main dataset id
    files: dict[Path, FileRecord] = field(default_factory=dict)  # every image looked at, as validated
    decoded: int = 0  # images decoded this time (the others were unchanged since the last build)
    records_current: bool = False  # what the caches' validation records say is exactly `files`
    sampling: str = "combined"  # conditioning_multidataset_sampling

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def trainable(self) -> bool:
        return not self.errors and any(self.samples.values())

    def render(self, limit: int = 10) -> str:
        """The human report: counts per dataset, then problems grouped by kind (`limit` lines each)."""
        lines = [f"prep validate: {self.config_path} ({self.flavour})"]
        for scan in self.datasets:
            samples = self.samples.get(scan.dataset_id, [])
            held = sum(s.split == "eval" for s in samples)
            lines.append(
                f"dataset '{scan.dataset_id}' ({scan.root}): {scan.n_images} edit images, {len(samples)} usable"
                + (f", {held} of them held out for previews and the held-out loss (eval split)" if held else "")
            )
            for cond in scan.conditioning:
                lines.append(
                    f"  reference '{cond.dataset_id}' ({cond.root}): {cond.missing} edit image(s) without a reference, "
                    f"{cond.extra} reference(s) without an edit image"
                )
            if len(scan.conditioning) > 1:
                n = len(scan.conditioning)
                lines.append(
                    f"  each train sample trains with all {n} references (conditioning_multidataset_sampling combined)"
                    if self.sampling == "combined"
                    else f"  each train sample trains with one of its {n} references, picked each time it is drawn "
                    "(conditioning_multidataset_sampling random); eval samples are previewed with all of them"
                )
        lines.append(f"errors: {len(self.errors)}, warnings: {len(self.warnings)}")
        for title, group in (("errors", self.errors), ("warnings", self.warnings)):
            if not group:
                continue
            lines.append(f"\n{title}:")
            kinds: dict[str, list[Finding]] = {}
            for finding in group:
                kinds.setdefault(finding.kind, []).append(finding)
            for kind, items in kinds.items():
                lines.append(f"  {kind} ({len(items)}):")
                lines += [f"    {item.message}" for item in items[:limit]]
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more (--json REPORT lists every one)")
        total = sum(len(s) for s in self.samples.values())
        if self.trainable:
            lines.append(f"\nTRAINABLE: {total} sample(s) in {len(self.samples)} dataset(s).")
        elif not self.errors:
            lines.append("\nNOT TRAINABLE: no sample is complete; add edit pairs and run `prep validate` again.")
        else:
            lines.append(f"\nNOT TRAINABLE: fix the {len(self.errors)} error(s) above, then run `prep validate` again.")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "config": self.config_path,
            "flavour": self.flavour,
            "trainable": self.trainable,
            "counts": {
                "errors": len(self.errors),
                "warnings": len(self.warnings),
                "samples": {k: len(v) for k, v in self.samples.items()},
            },
            "datasets": [
                {
                    "id": s.dataset_id,
                    "root": s.root,
                    "edit_images": s.n_images,
                    "trainable": len(self.samples.get(s.dataset_id, [])),
                    "conditioning": [asdict(c) for c in s.conditioning],
                }
                for s in self.datasets
            ],
            "findings": [asdict(f) for f in self.findings],
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def inspect_image(path: Path, record: FileRecord) -> FileRecord:
    """Decode `path` completely (so truncation shows); fill `record` (its `stat`) with size, notes and sha256."""
    record.sha256 = file_sha256(path)
    try:
        decoded = decode_image(path, record.max_pixels)
    except ImageError as err:
        record.error = str(err)
        return record
    record.width, record.height = decoded.size
    record.notes = decoded.notes
    return record


def validate(config: Config, workers: int | None = None) -> Report:
    """Check every main dataset of `config` and its references; decode each new or changed image once."""
    mains = config.main_datasets()
    scans = [scan_dataset(config, main) for main in mains]
    findings = [f for scan in scans for f in scan.findings] + eval_overlap(config)

    owners = _image_owners(config, scans)
    known = _known_records(config)
    infos, decoded = _decode_images(owners, known, workers)
    image_findings, bad = _decoded_findings(infos, owners)
    findings += image_findings

    samples: dict[str, list[Sample]] = {}
    for scan, main in zip(scans, mains, strict=True):
        kept, sample_findings = _trainable_samples(config, main, scan, infos, bad)
        samples[main.id] = kept
        findings += sample_findings
    findings += eval_copies(config, samples, infos)

    return Report(
        str(config.config_path),
        config.train.model_flavour,
        scans,
        findings,
        samples,
        files=infos,
        decoded=decoded,
        records_current=decoded == 0 and infos.keys() == known.keys(),
        sampling=config.train.conditioning_multidataset_sampling,
    )


def _image_owners(config: Config, scans: list[ScanResult]) -> dict[Path, DatasetConfig]:
    """Every image file of every dataset involved, with the dataset it belongs to (the first that lists it)."""
    owners: dict[Path, DatasetConfig] = {}
    for scan, main in zip(scans, config.main_datasets(), strict=True):
        for dataset in [main, *config.conditioning_for(main)]:
            root = Path(dataset.instance_data_dir)
            for relpath in scan.listings.get(root, []):
                owners.setdefault(root / relpath, dataset)
    return owners


def _known_records(config: Config) -> dict[Path, FileRecord]:
    """The file records the main datasets' caches kept from their last validation."""
    known: dict[Path, FileRecord] = {}
    for main in config.main_datasets():
        known.update(load_records(CacheFolder(config.cache_location_for(main))))
    return known


def _decode_images(
    owners: dict[Path, DatasetConfig], known: dict[Path, FileRecord], workers: int | None
) -> tuple[dict[Path, FileRecord], int]:
    """Each image's record (reused if unchanged since `known`, else decoded now), and how many were decoded."""
    infos: dict[Path, FileRecord] = {}
    todo: dict[Path, FileRecord] = {}  # new or changed files: their `stat`, to be filled by decoding
    for path, dataset in owners.items():
        current = stat_record(path, dataset.max_image_pixels)
        if unchanged(known.get(path), current):
            infos[path] = known[path]
        else:
            todo[path] = current
    # Decoded in threads: PIL releases the GIL.
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        infos.update(zip(todo, pool.map(inspect_image, todo, todo.values()), strict=True))
    return infos, len(todo)


def _decoded_findings(
    infos: dict[Path, FileRecord], owners: dict[Path, DatasetConfig]
) -> tuple[list[Finding], set[Path]]:
    """The findings about every decoded image, and the images that cannot train (unreadable or too small)."""
    findings: list[Finding] = []
    bad: set[Path] = set()
    for path, info in infos.items():
        found = _image_findings(path, info, owners[path])
        findings += found
        if any(finding.severity == "error" for finding in found):
            bad.add(path)
    return findings, bad


def _image_findings(path: Path, info: FileRecord, dataset: DatasetConfig) -> list[Finding]:
    """The problems of one decoded image: unreadable, converted on load, below minimum size, upscaled over 2x."""
    if info.error:
        return [Finding("error", "unreadable image", dataset.id, str(path), info.error)]
    found = []
    if info.notes:
        found.append(Finding("warning", "converted on load", dataset.id, str(path), f"{path}: {'; '.join(info.notes)}"))
    width, height = info.size
    if not meets_minimum(width, height, dataset.minimum_image_size, dataset.resolution_type):
        found.append(
            Finding(
                "error",
                "image below minimum size",
                dataset.id,
                str(path),
                f"{path}: {width}x{height} is below minimum_image_size "
                f"{dataset.minimum_image_size:g} ({dataset.resolution_type}) of dataset '{dataset.id}'; "
                "replace it with a larger image, remove it, or lower minimum_image_size",
            )
        )
        return found
    factor = upscale_factor(width, height, dataset)
    if factor > MAX_UPSCALE:
        found.append(
            Finding(
                "warning",
                "image upscaled more than 2x",
                dataset.id,
                str(path),
                f"{path}: {width}x{height} is upscaled {factor:.1f}x per side to reach its bucket at "
                f"resolution {dataset.resolution:g} ({dataset.resolution_type}) of dataset '{dataset.id}', so it "
                "trains on blurred pixels; use a larger image, or set minimum_image_size to exclude such files",
            )
        )
    return found


def _trainable_samples(
    config: Config, main: DatasetConfig, scan: ScanResult, infos: dict[Path, FileRecord], bad: set[Path]
) -> tuple[list[Sample], list[Finding]]:
    """The samples of `main` that can train, eval split held out, and the findings about their references and crops."""
    conds = config.conditioning_for(main)
    flavour = FLAVOURS[config.train.model_flavour]
    kept: list[Sample] = []
    findings: list[Finding] = []
    for sample in scan.samples:
        if sample.image in bad or any(r in bad for r in sample.references):
            continue
        problems = _reference_findings(sample, conds, infos, flavour)
        findings += problems
        if problems:
            continue
        kept.append(sample)
        crop = crop_warning(sample, infos[sample.image].size, main, config.train.crop_seed)
        if crop:
            findings.append(crop)
    return hold_out(config, kept), findings


def _reference_findings(
    sample: Sample, conds: list[DatasetConfig], infos: dict[Path, FileRecord], flavour: Flavour
) -> list[Finding]:
    """The errors about `sample`'s references: strict aspect mismatches first, then sizes the VL encoder refuses."""
    pairs = list(zip(conds, sample.references, strict=True))
    found = [_aspect_mismatch(sample, cond, ref, infos) for cond, ref in pairs]
    found += [_vl_refusal(cond, ref, infos[ref], flavour) for cond, ref in pairs]
    return [finding for finding in found if finding is not None]


def _aspect_mismatch(sample: Sample, cond: DatasetConfig, ref: Path, infos: dict[Path, FileRecord]) -> Finding | None:
    """An error when a reference_strict reference does not have its edit image's aspect, else None."""
    if cond.conditioning_type != "reference_strict":
        return None
    target_w, target_h = infos[sample.image].size
    ref_w, ref_h = infos[ref].size
    if abs((ref_w / ref_h) / (target_w / target_h) - 1) <= ASPECT_TOLERANCE:
        return None
    return Finding(
        "error",
        "reference aspect differs from its target (reference_strict)",
        cond.id,
        str(ref),
        f"{ref}: {ref_w}x{ref_h} does not have the aspect of its edit image {sample.image} "
        f"({target_w}x{target_h}), so the same crop cannot fit both; crop it to that aspect, "
        f"or set conditioning_type 'reference_loose' on dataset '{cond.id}'",
    )


def _vl_refusal(cond: DatasetConfig, ref: Path, info: FileRecord, flavour: Flavour) -> Finding | None:
    """An error when Qwen2.5-VL cannot take this reference (see `vl_size_problem`), else None."""
    problem = vl_size_problem(*info.size, flavour)
    if not problem:
        return None
    return Finding(
        "error",
        "reference the VL encoder cannot take",
        cond.id,
        str(ref),
        f"{ref}: {info.size[0]}x{info.size[1]}: {problem}; crop or pad it to a less extreme aspect ratio, or remove it",
    )


def eval_overlap(config: Config) -> list[Finding]:
    """A warning when the eval dataset's folder is a training dataset's, or inside one, or holds one: its
    held-out loss and previews would then be measured on images the LoRA trains on."""
    eval_id = config.train.eval_dataset_id
    mains = config.main_datasets()
    evals = [m for m in mains if m.id == eval_id]
    if not evals:
        return []
    eval_dir = Path(evals[0].instance_data_dir).resolve()
    found = []
    for main in mains:
        train_dir = Path(main.instance_data_dir).resolve()
        if main.id != eval_id and (
            eval_dir == train_dir or train_dir in eval_dir.parents or eval_dir in train_dir.parents
        ):
            found.append(
                Finding(
                    "warning",
                    "eval data overlaps training data",
                    eval_id,
                    str(eval_dir),
                    f"{eval_dir}: the eval dataset '{eval_id}' shares its folder with training dataset '{main.id}' "
                    f"({train_dir}), so the held-out loss and previews are measured on training images; give the "
                    "eval dataset a folder of its own",
                )
            )
    return found


def eval_copies(config: Config, samples: dict[str, list[Sample]], files: dict[Path, FileRecord]) -> list[Finding]:
    """A warning when edit images of the eval dataset are byte-identical to training edit images (copied into
    another folder): the held-out loss would be measured on images the LoRA trains on."""
    eval_id = config.train.eval_dataset_id
    if eval_id not in samples:
        return []
    trained = {files[s.image].sha256: s.image for m, group in samples.items() if m != eval_id for s in group}
    copies = [(s.image, trained.get(files[s.image].sha256)) for s in samples[eval_id]]
    copies = [(image, original) for image, original in copies if original not in (None, image)]  # same file: a
    # shared folder, which eval_overlap names
    if not copies:
        return []
    first, original = copies[0]
    return [
        Finding(
            "warning",
            "eval data overlaps training data",
            eval_id,
            str(first),
            f"{first}: {len(copies)} edit image(s) of the eval dataset '{eval_id}' are byte-identical to training "
            f"images (this one to {original}), so the held-out loss and previews partly measure training images; "
            "remove them from one of the two",
        )
    ]


MAX_CROPPED = 0.5  # share of an image's area its crop may cut away before the report says so


def crop_warning(sample: Sample, size: tuple[int, int], main: DatasetConfig, seed: int) -> Finding | None:
    """A warning when the crop to its bucket cuts away more than half of the edit image (and its strict
    references, which share its placement)."""
    placement = plan_placement(*size, main, seed, sample.sample_id)
    left, top, right, bottom = placement.box
    kept = (right - left) * (bottom - top) / (placement.scaled[0] * placement.scaled[1])
    if 1 - kept <= MAX_CROPPED:
        return None
    why = "crop_aspect square" if main.crop and main.crop_aspect == "square" else "the bucket's aspect limits"
    return Finding(
        "warning",
        "more than half of the image cropped away",
        main.id,
        str(sample.image),
        f"{sample.image}: {size[0]}x{size[1]} keeps {kept:.0%} of its area in its {placement.size[0]}x"
        f"{placement.size[1]} bucket ({why}); crop or pad it yourself to choose what stays, or remove it",
    )


def vl_size_problem(width: int, height: int, flavour: Flavour) -> str:
    """Why Qwen2.5-VL could not see this reference at the flavour's VL area, or "" when it can."""
    ratio = max(width / height, height / width)
    if ratio > MAX_VL_ASPECT:
        return f"its aspect ratio {ratio:.0f}:1 is beyond the {MAX_VL_ASPECT}:1 the VL encoder accepts"
    vl_w, vl_h = calculate_dimensions(flavour.vl_area, width / height)
    if min(vl_w, vl_h) < 32:
        return f"resized for the VL encoder it would be {vl_w}x{vl_h} pixels, a side below 32"
    return ""


def upscale_factor(width: int, height: int, dataset: DatasetConfig) -> float:
    """How much the image's sides are scaled up to cover its bucket (<= 1: downscaled)."""
    bucket_w, bucket_h = bucket_size(width, height, dataset.resolution, dataset.resolution_type)
    return max(bucket_w / width, bucket_h / height)
