"""Discover edit samples: pair each edit image with its references and read its captions.

A sample is the edit image at relative path P under the main dataset's `instance_data_dir`;
each conditioning dataset must hold a file at the same relative path P (nested folders and
unicode names included, compared byte for byte, so case-sensitive like the filesystem). A
conditioning dataset with `"match": "stem"` pairs on P without its extension (`a.png` with
`a.jpg`) and reports stems that name more than one file.

The folders' files come from `prep/listing.py`. Nothing here decodes an image: problems found are
returned as `Finding`s, never raised.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from prep.captions import CaptionTable, read_captions
from prep.listing import Listing, outside, walk_images
from shared.config import Config, DatasetConfig


@dataclass
class Finding:
    """One problem, about one file (or folder), with what to do about it."""

    severity: str  # "error": not trainable until fixed; "warning": handled, but worth knowing
    kind: str  # short heading the report groups by, e.g. "edit image without reference"
    dataset_id: str
    path: str
    message: str  # "<path>: <what>; <what to do>"


@dataclass
class Sample:
    dataset_id: str
    relpath: str  # POSIX path relative to the main dataset's instance_data_dir
    image: Path
    references: list[Path]  # one per conditioning dataset, in conditioning_data order
    captions: list[str]
    caption_source: Path | None = None  # the file the captions came from, if any
    split: str = "train"

    @property
    def sample_id(self) -> str:
        """Stable hex id (no dots, as webdataset keys need) from the dataset id and relative path."""
        return hashlib.sha1(f"{self.dataset_id}/{self.relpath}".encode()).hexdigest()[:20]


@dataclass
class ConditioningCounts:
    dataset_id: str
    root: str
    missing: int = 0  # edit images with no reference here
    extra: int = 0  # references here with no edit image


@dataclass
class ScanResult:
    dataset_id: str
    root: str
    n_images: int = 0
    samples: list[Sample] = field(default_factory=list)  # paired and captioned
    findings: list[Finding] = field(default_factory=list)
    conditioning: list[ConditioningCounts] = field(default_factory=list)
    listings: dict[Path, list[str]] = field(default_factory=dict)  # dataset root -> its images (list_images)


def _utf8(name: str) -> bool:
    """False for names holding bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _named(key: str, named: set[str]) -> bool:
    """Whether `key` (a relative path or stem) is a file already reported, or lies in a folder link refused."""
    return key in named or any(key.startswith(name + "/") for name in named)


def _stem(relpath: str) -> str:
    return str(PurePosixPath(relpath).with_suffix(""))


def _fold(relpath: str) -> str:
    """Case- and unicode-insensitive form, only to hint at near-miss names."""
    return unicodedata.normalize("NFC", relpath).casefold()


def scan_dataset(config: Config, main: DatasetConfig) -> ScanResult:
    """Pair and caption every edit image of `main`; every problem becomes a Finding."""
    main_root = Path(main.instance_data_dir)
    result = ScanResult(main.id, str(main_root))
    conds = config.conditioning_for(main)

    # Files already named (a broken link, a name that is not UTF-8): not reported again as missing their pair.
    named: dict[Path, set[str]] = {}
    folders_missing = False  # a dataset folder missing or empty: pairing would only repeat that, file by file
    for dataset in [main, *conds]:
        named[Path(dataset.instance_data_dir)] = _list_dataset(result, dataset)
        if not _folder_usable(result, dataset):
            folders_missing = True
    if folders_missing:
        return result

    table = _open_caption_table(result, main)
    images = result.listings[main_root]
    result.n_images = len(images)
    if any(cond.match == "stem" for cond in conds):
        _refuse_ambiguous_stems(
            result, main, images, "edit images", ", so stem matching cannot tell them apart; rename one"
        )

    references: dict[str, list[Path | None]] = {relpath: [] for relpath in images}
    for cond in conds:
        _pair_references(result, cond, main_root, images, named, references)

    for relpath in images:
        sample = _caption_sample(result, config, main, relpath, table, references[relpath])
        if sample is not None:
            result.samples.append(sample)
    return result


def _error(result: ScanResult, kind: str, dataset_id: str, path: Path | str, message: str) -> None:
    """Returns None; adds an error finding about `path` to `result`."""
    result.findings.append(Finding("error", kind, dataset_id, str(path), f"{path}: {message}"))


def _warning(result: ScanResult, kind: str, dataset_id: str, path: Path | str, message: str) -> None:
    """Returns None; adds a warning finding about `path` to `result`."""
    result.findings.append(Finding("warning", kind, dataset_id, str(path), f"{path}: {message}"))


def _key(relpath: str, match: str) -> str:
    """The name `relpath` is paired by: its stem under `"match": "stem"`, else the relative path itself."""
    return _stem(relpath) if match == "stem" else relpath


def _list_dataset(result: ScanResult, dataset: DatasetConfig) -> set[str]:
    """The names the listing already reported (broken, outside or non-UTF-8); stores the usable images in `result`."""
    root = Path(dataset.instance_data_dir)
    listing = walk_images(root, dataset.allow_links_outside)
    result.listings[root] = [name for name in listing.images if _utf8(name)]
    _report_listing(result, dataset.id, root, listing)
    not_utf8 = {name for name in listing.images if not _utf8(name)}
    return set(listing.broken) | set(listing.outside) | not_utf8


def _report_listing(result: ScanResult, dataset_id: str, root: Path, listing: Listing) -> None:
    """Returns None; adds a finding for each file the listing could not use (name, loop, link, format)."""
    for name in listing.images:
        if not _utf8(name):
            shown = os.fsencode(name).decode("utf-8", "backslashreplace")
            _error(
                result,
                "file name not UTF-8",
                dataset_id,
                root / shown,
                "this file name is not valid UTF-8, which the cache and captions need; rename it",
            )
    for loop in listing.loops:
        _warning(
            result,
            "symlink loop",
            dataset_id,
            root / loop,
            "this symlinked folder leads back to a folder already listed; its images are counted once (remove the "
            "link if it is a mistake)",
        )
    for name in listing.broken:
        _error(
            result,
            "broken symlink",
            dataset_id,
            root / name,
            "a symlink to a file that does not exist; fix or remove it",
        )
    for name in sorted(listing.unsupported):
        _warning(
            result,
            "image format not read",
            dataset_id,
            root / name,
            f"{os.path.splitext(name)[1]} files are not read, so it is left out; convert it to PNG or JPEG to "
            "train on it",
        )
    for name in listing.outside:
        _error(
            result,
            "link outside the dataset folder",
            dataset_id,
            root / name,
            f"a link to {listing.targets[name]}, outside {root}, so it is not read; copy what it holds into "
            f"the folder, or set allow_links_outside: true on dataset '{dataset_id}'",
        )


def _folder_usable(result: ScanResult, dataset: DatasetConfig) -> bool:
    """Whether the dataset's folder exists and holds images; when not, adds an error saying so."""
    root = Path(dataset.instance_data_dir)
    if not root.is_dir():
        _error(
            result,
            "missing folder",
            dataset.id,
            root,
            f"folder of dataset '{dataset.id}' does not exist; fix instance_data_dir",
        )
        return False
    if not result.listings[root]:
        _error(
            result,
            "empty folder",
            dataset.id,
            root,
            f"no images in dataset '{dataset.id}'; add images or fix instance_data_dir",
        )
        return False
    return True


def _open_caption_table(result: ScanResult, main: DatasetConfig) -> CaptionTable | None:
    """The dataset's caption table (None if it has none or it cannot be read); reports names with several rows."""
    if main.caption_strategy != "parquet":
        return None
    try:
        table = CaptionTable(main.parquet, main.id)
    except (OSError, ValueError, KeyError) as err:
        path = main.parquet.get("path", "<no parquet.path>")
        _error(result, "caption table problem", main.id, path, f"cannot read captions ({err})")
        return None
    for name, n in sorted(table.repeated.items()):
        _error(
            result,
            "caption table problem",
            main.id,
            table.path,
            f"'{name}' has {n} rows, so which caption it trains with is unclear; keep one row per image "
            "(several captions go in one row, as a list)",
        )
    return table


def _refuse_ambiguous_stems(
    result: ScanResult, dataset: DatasetConfig, files: list[str], what: str, advice: str
) -> None:
    """Adds an error for each stem that names several of `dataset`'s `files` (stem matching cannot pair them)."""
    by_stem: dict[str, list[str]] = {}
    for relpath in files:
        by_stem.setdefault(_stem(relpath), []).append(relpath)
    for stem, same in by_stem.items():
        if len(same) > 1:
            where = Path(dataset.instance_data_dir) / stem
            message = f"{len(same)} {what} share this name ({', '.join(same)}){advice}"
            _error(result, "ambiguous name", dataset.id, where, message)


def _pair_references(
    result: ScanResult,
    cond: DatasetConfig,
    main_root: Path,
    images: list[str],
    named: dict[Path, set[str]],
    references: dict[str, list[Path | None]],
) -> None:
    """Returns None; appends each edit image's reference in `cond` (None if unpaired) to `references`."""
    root = Path(cond.instance_data_dir)
    have = result.listings[root]
    counts = ConditioningCounts(cond.id, str(root))
    result.conditioning.append(counts)
    by_key: dict[str, list[str]] = {}
    for relpath in have:
        by_key.setdefault(_key(relpath, cond.match), []).append(relpath)
    if cond.match == "stem":
        _refuse_ambiguous_stems(result, cond, have, "references", "; keep one per edit image")

    folded = {_fold(p): p for p in have}
    keys = {relpath: _key(relpath, cond.match) for relpath in images}
    reported = {_key(name, cond.match) for name in named[root]}  # by the key pairing uses (a stem or a path)
    for relpath in images:
        found = by_key.get(keys[relpath], [])
        # Several files under one stem: an ambiguous name, reported above, so left unpaired.
        references[relpath].append(root / found[0] if len(found) == 1 else None)
        if found or _named(keys[relpath], reported):
            continue  # paired, or its reference is the broken link (or unusable name, or refused link) reported above
        counts.missing += 1
        near = folded.get(_fold(relpath))
        hint = f" (there is {root / near}: names must match exactly, case included)" if near else ""
        _error(
            result,
            "edit image without reference",
            cond.id,
            main_root / relpath,
            f"no reference at {root / relpath}{hint}; add it with the same relative path, or remove the edit image",
        )

    extras = sorted(f for key in set(by_key) - set(keys.values()) for f in by_key[key])
    _report_extra_references(result, cond, main_root, extras, named[main_root], counts)


def _report_extra_references(
    result: ScanResult,
    cond: DatasetConfig,
    main_root: Path,
    extras: list[str],
    named_main: set[str],
    counts: ConditioningCounts,
) -> None:
    """Returns None; counts and reports each reference of `cond` that has no edit image."""
    root = Path(cond.instance_data_dir)
    named_keys = {_key(name, cond.match) for name in named_main}
    for extra in extras:
        if _named(_key(extra, cond.match), named_keys):
            continue  # its edit image is the broken link (or unusable name, or refused link) reported above
        counts.extra += 1
        _error(
            result,
            "reference without edit image",
            cond.id,
            root / extra,
            f"no edit image at {main_root / extra}; add the edit image, or remove this reference",
        )


def _caption_sample(
    result: ScanResult,
    config: Config,
    main: DatasetConfig,
    relpath: str,
    table: CaptionTable | None,
    references: list[Path | None],
) -> Sample | None:
    """The sample of `relpath` if it has captions and all its references, else None; reports caption problems."""
    main_root = Path(main.instance_data_dir)
    spellings = table.keys_for(relpath) if table is not None else []
    if len(spellings) > 1:
        _error(
            result,
            "caption table problem",
            main.id,
            table.path,
            f"rows {', '.join(repr(k) for k in spellings)} all name {relpath}, so which caption it trains with is "
            "unclear; keep one row per image (several captions go in one row, as a list)",
        )
        return None
    if _caption_link_refused(result, main, relpath):
        return None
    captions, source = read_captions(main, main_root / relpath, relpath, table)
    if not captions:
        where = (
            f"no caption in {source}"
            if main.caption_strategy == "parquet"
            else f"no caption ({source} is missing, empty or not UTF-8)"
        )
        _error(result, "missing caption", main.id, main_root / relpath, f"{where}; write the instruction there")
        return None
    if any(ref is None for ref in references):
        return None
    split = "eval" if config.train.eval_dataset_id == main.id else "train"
    return Sample(main.id, relpath, main_root / relpath, references, captions, source, split)


def _caption_link_refused(result: ScanResult, main: DatasetConfig, relpath: str) -> bool:
    """Whether the caption file of `relpath` is a link leading outside the dataset folder (then reported)."""
    main_root = Path(main.instance_data_dir)
    text_file = (main_root / relpath).with_suffix(".txt")
    if main.caption_strategy != "textfile" or main.allow_links_outside or not text_file.is_symlink():
        return False
    if not outside(text_file, main_root):
        return False
    _error(
        result,
        "link outside the dataset folder",
        main.id,
        text_file,
        f"a caption file linking to {text_file.resolve()}, outside {main_root}, so it is not read; "
        f"write the caption there, or set allow_links_outside: true on dataset '{main.id}'",
    )
    return True
