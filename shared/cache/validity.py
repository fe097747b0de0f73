"""Is this cache still valid for this config? Answered here for both stages: `prep build-cache` asks what of a
cache it may keep (`judge_for_build`: the same fingerprint, shards as sealed, a manifest as written), and
`train run` asks whether a cache holds what its config would train on (`check_for_training`: flavour, prep
settings, the model's shapes, caption-dropout records)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from shared.cache.fingerprint import PER_SAMPLE, changed_settings, training_mismatches
from shared.cache.folder import CacheFolder
from shared.cache.format import CACHE_JSON, DAMAGED, DROPOUT_SHARD, MANIFEST, SHARDS_DIR
from shared.cache.store import CacheStore, manifest_metadata
from shared.cache.writer import ShardTable
from shared.config import Config, DatasetConfig
from shared.errors import UserError
from shared.parquet import read_parquet


@dataclass
class BuildJudgement:
    """What a build under one fingerprint may keep of the cache it finds."""

    manifest: tuple[str, set[str]] | None  # (fingerprint sha256, sample ids) of a readable manifest
    info: dict  # cache.json ({} when missing or damaged)
    force: bool  # encode every sample again (asked for, or the manifest is not the one the build wrote)
    recorded: bool  # cache.json records exactly this fingerprint (hash and settings)


def judge_for_build(folder: CacheFolder, fingerprint: dict, force: bool) -> BuildJudgement:
    """Read the cache's manifest ids and cache.json once; refuse (`UserError`) a cache built with other
    settings unless `force`, naming the settings that changed."""
    manifest = None if force else read_manifest_ids(folder)
    info = read_cache_info(folder) or {}  # read once: each read is a round trip at a URL
    if manifest is not None and not CacheStore(folder.location).manifest_as_written(info):
        print(f"note: {folder.url(MANIFEST)} differs from the one the build wrote; every sample is encoded again")
        manifest, force = None, True
    if manifest is not None and manifest[0] != fingerprint["sha256"]:
        raise UserError(_fingerprint_message(folder, info, fingerprint["settings"]))
    recorded = _same(info.get("fingerprint"), fingerprint)
    return BuildJudgement(manifest, info, force, recorded)


def read_manifest_ids(folder: CacheFolder) -> tuple[str, set[str]] | None:
    """(fingerprint, sample ids) of the cache's manifest; None when there is none or it cannot be read
    (cut short or damaged: then every sample no sealed shard index holds is encoded again)."""
    if not folder.exists(MANIFEST):
        return None
    try:
        with folder.open(MANIFEST) as f:  # the one column read, not the whole manifest
            table = read_parquet(f, ["sample_id"])
    except (OSError, pa.ArrowException) as err:
        print(f"note: {folder.url(MANIFEST)} cannot be read ({err}); its samples are encoded again")
        return None
    return manifest_metadata(table.schema)["fingerprint"], set(table.column("sample_id").to_pylist())


def read_cache_info(folder: CacheFolder) -> dict | None:
    """cache.json; None when missing, empty or damaged (the next commit writes it again)."""
    try:
        info = json.loads(folder.read(CACHE_JSON) or b"")
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _same(recorded: dict | None, current: dict) -> bool:
    """cache.json records `current` (hash and settings: the per-sample preview settings are not hashed)."""
    return json.dumps(recorded, sort_keys=True, default=str) == json.dumps(current, sort_keys=True, default=str)


def damaged_shards(folder: CacheFolder, shards: ShardTable) -> set[str]:
    """Shards that are missing or not the size they were sealed at (one listing), and those `prep verify`
    found damaged (named in damaged.json): their samples are encoded again rather than reported up to date.
    (`prep verify` checks every byte.)"""
    sizes = folder.listing(SHARDS_DIR)
    damaged = set()
    for name, recorded in shards.items():
        if sizes.get(name.removeprefix(f"{SHARDS_DIR}/")) != recorded["bytes"]:
            damaged.add(name)
            print(f"note: {folder.url(name)} is missing or damaged; its samples are encoded again")
    return damaged | _verify_found_damaged(folder)


def _verify_found_damaged(folder: CacheFolder) -> set[str]:
    try:
        shards = set(json.loads(folder.read(DAMAGED) or b"")["shards"])
    except (ValueError, KeyError, TypeError):
        return set()
    for shard in sorted(shards):
        print(f"note: prep verify found {folder.url(shard)} damaged; its samples are encoded again")
    return shards


def holds_uncommitted_work(folder: CacheFolder) -> bool:
    """Index files are deleted by every commit: any left over hold sealed work the manifest does not list yet."""
    return any(name.endswith(".index.parquet") for name in folder.listing(SHARDS_DIR))


def _fingerprint_message(folder: CacheFolder, info: dict, settings: dict) -> str:
    try:
        changed = changed_settings(info["fingerprint"]["settings"], settings)
    except (KeyError, TypeError):
        changed = ["(cache.json unreadable)"]
    return (
        f"{folder}: this cache was built with other settings (changed: {', '.join(changed)}); its samples "
        "cannot be mixed with new ones. Rerun with --force to rebuild it, or point cache_dir elsewhere."
    )


def check_for_training(config: Config, main: DatasetConfig, location: str, info: dict) -> None:
    """The cache must hold what this config's prep settings would encode (resolution, crops, template, ...)
    for this transformer and VAE: otherwise training would silently learn from other data. Checked without the
    text encoder (a training node need not hold it) and wherever the model now lies. `info`: its cache.json."""
    if info["flavour"] != config.train.model_flavour:
        raise UserError(
            f"{location}: built for {info['flavour']}, but model_flavour is "
            f"{config.train.model_flavour}; rebuild it with `prep build-cache`"
        )
    built = info.get("fingerprint", {}).get("settings", {})
    changed = training_mismatches(config, main, built)
    if changed and set(changed) <= set(PER_SAMPLE):
        raise UserError(
            f"{location}: its eval samples were cached with other preview settings "
            "(validation_negative_prompt / validation_resolution); run "
            f"`prep build-cache --config {config.config_path}` (it re-encodes the eval samples only)"
        )
    if changed:
        raise UserError(
            f"{location}: built with other prep settings than {config.config_path} gives (changed: "
            f"{', '.join(changed)}); rebuild it with `prep build-cache --config {config.config_path} --force`, "
            "or train with the config it was built with"
        )


def check_dropout_records(config: Config, location: str) -> None:
    """Caption dropout trains on each sample's empty-instruction embedding: refuse a cache whose train samples
    lack it (built with caption dropout off), with the command that adds only those."""
    store = CacheStore(location)
    if DROPOUT_SHARD not in store.manifest_columns():
        return  # written before dropout records had shards of their own: the embeddings member holds them
    rows = store.read_manifest(["split", DROPOUT_SHARD])
    train = rows.filter(pc.equal(rows.column("split"), "train"))
    lacking = train.column(DROPOUT_SHARD).null_count
    if lacking:
        raise UserError(
            f"{location}: caption_dropout_probability is {config.train.caption_dropout_probability}, but "
            f"{lacking} of its {train.num_rows} training samples have no empty-instruction embedding (the cache "
            f"was built with caption dropout off). Run `prep build-cache --config {config.config_path}`: it adds "
            "them alone (the images' VL pass, no VAE; no shard is rewritten). Or set caption_dropout_probability 0."
        )
