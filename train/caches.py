"""Which caches a run may train on: a reader per training dataset and one for the eval samples, each cache
checked (shared/cache/validity.py) against what training depends on (flavour, prep settings, the
transformer's and VAE's shapes) and what the config needs of it (dropout records for caption dropout)."""

from __future__ import annotations

from shared.cache import needs_dropout
from shared.cache.validity import check_dropout_records, check_for_training
from shared.config import Config
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
        check_for_training(config, main, location, eval_readers[-1].info)
    return train_readers, eval_readers
