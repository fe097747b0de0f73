"""Which caches a run may train on: a reader per training dataset and one for the eval samples, each cache
checked against what training depends on (flavour, prep settings, the transformer's and VAE's shapes) and
against what the config needs of it (dropout records for caption dropout)."""

from __future__ import annotations

import pyarrow.compute as pc

from shared.cache import DROPOUT_SHARD, CacheStore, needs_dropout
from shared.cache.fingerprint import PER_SAMPLE, training_mismatches
from shared.config import Config, DatasetConfig
from shared.errors import UserError
from train.loader import CacheReader


def open_caches(config: Config) -> tuple[list[CacheReader], list[CacheReader]]:
    """(a reader of the training rows of each training dataset's cache, a reader of the eval rows of every
    main dataset's cache), refusing caches of another flavour or built with other prep settings."""
    train_readers, eval_readers = [], []
    for main in config.main_datasets():
        location = config.cache_location_for(main)
        if main.id != config.train.eval_dataset_id:
            dropout = needs_dropout(config.train.caption_dropout_probability)
            if dropout:
                check_dropout_records(config, location)
            reader = CacheReader(location, main.id, main.repeats, main.probability or None, dropout=dropout)
            train_readers.append(reader)
        eval_readers.append(CacheReader(location, main.id, split="eval"))
        check_cache(config, main, eval_readers[-1])
    return train_readers, eval_readers


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


def check_cache(config: Config, main: DatasetConfig, reader: CacheReader) -> None:
    """The cache must hold what this config's prep settings would encode (resolution, crops, template, ...)
    for this transformer and VAE: otherwise training would silently learn from other data. Checked without the
    text encoder (a training node need not hold it) and wherever the model now lies."""
    if reader.info["flavour"] != config.train.model_flavour:
        raise UserError(
            f"{reader.location}: built for {reader.info['flavour']}, but model_flavour is "
            f"{config.train.model_flavour}; rebuild it with `prep build-cache`"
        )
    built = reader.info.get("fingerprint", {}).get("settings", {})
    changed = training_mismatches(config, main, built)
    if changed and set(changed) <= set(PER_SAMPLE):
        raise UserError(
            f"{reader.location}: its eval samples were cached with other preview settings "
            "(validation_negative_prompt / validation_resolution); run "
            f"`prep build-cache --config {config.config_path}` (it re-encodes the eval samples only)"
        )
    if changed:
        raise UserError(
            f"{reader.location}: built with other prep settings than {config.config_path} gives (changed: "
            f"{', '.join(changed)}); rebuild it with `prep build-cache --config {config.config_path} --force`, "
            "or train with the config it was built with"
        )
