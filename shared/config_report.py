"""What a loaded config tells the user before anything runs: notes on SimpleTuner-only entries, the keys read
past (loudly when they change training), and every resolved setting with its source (`--print-config`)."""

from __future__ import annotations

from dataclasses import fields

from shared import simpletuner
from shared.config import CACHE_ONLY_TYPES, Config, DatasetConfig, TrainConfig


def notes(config: Config) -> list[str]:
    """What SimpleTuner-only dataset entries and settings mean here (one line each), loudly where a value
    you set does less here than in SimpleTuner."""
    lines = [f"WARNING: differs from SimpleTuner: {line}" for line in config.differences]
    lines += [
        f"note: dataset '{d.id}' ({d.dataset_type}) is not needed here: each main dataset's cache (its "
        "cache_dir or cache_dir_vae) holds its latents and text embeddings together; this entry's cache_dir "
        "is not used"
        for d in config.datasets
        if d.dataset_type in CACHE_ONLY_TYPES and not d.disabled
    ]
    lines += [  # SimpleTuner refuses captions on reference datasets in combined mode
        f"note: dataset '{d.id}' sets caption_strategy, which a reference dataset does not use: every sample "
        "trains with its edit image's captions (remove the key, or set it to null, as SimpleTuner's guides do)"
        for d in config.datasets
        if d.dataset_type == "conditioning"
        and not d.disabled
        and "caption_strategy" in config.dataset_keys.get(d.id, ())
    ]
    return lines


def ignored_report(config: Config) -> list[str]:
    """Lines telling the user which keys were read past (empty when none were): loudly, one per key, those
    that change what SimpleTuner would train; in one quiet line the rest (previews, hub, trackers, ...)."""
    loud, quiet = simpletuner.classify_ignored(config.ignored)
    lines = []
    if loud:
        lines.append(f"WARNING: {len(loud)} key(s) change what you train in SimpleTuner; we do not support them yet:")
        lines += [f"  {line}" for line in loud]
    if quiet:
        lines.append(f"ignored {len(quiet)} key(s) that do not change training: " + ", ".join(quiet))
    return lines


def resolved(config: Config) -> list[str]:
    """Every setting with its value and where it came from: the file, the command line, or a default (and
    SimpleTuner's default where ours differs). For `train run --print-config` and `prep validate`."""
    differ = {d.key: d for d in simpletuner.DIFFERENCES}
    lines = [f"{config.config_path}:"]
    for f in fields(TrainConfig):
        value = getattr(config.train, f.name)
        if f.name in config.overridden:
            source = "command line"
        elif f.name in config.explicit:
            source = config.config_path.name
        elif f.name in simpletuner.DEEPSPEED_ONLY_KEYS:
            source = "resolved from optimizer, optimizer_config, optimizer_beta1/2, as SimpleTuner resolves them"
        elif f.name in differ:
            source = f"default; SimpleTuner's is {differ[f.name].simpletuner}"
        elif f.name in simpletuner.SAME_DEFAULTS:
            source = "default, as SimpleTuner's"
        else:
            source = "default"
        lines.append(f"  {f.name} = {value!r}  [{source}]")
    fallbacks = {"resolution", "resolution_type", "minimum_image_size"}
    for dataset in config.datasets:
        lines.append(f"{config.backend_path}: dataset '{dataset.id}':")
        keys = config.dataset_keys.get(dataset.id, set())
        for f in fields(DatasetConfig):
            if f.name == "id":
                continue
            if f.name in keys:
                source = config.backend_path.name
            elif f.name in fallbacks and f.name in config.explicit:
                source = f"{config.config_path.name}'s {f.name}"
            else:
                source = "default, as SimpleTuner's" if f.name in simpletuner.SAME_DEFAULTS else "default"
            lines.append(f"  {f.name} = {getattr(dataset, f.name)!r}  [{source}]")
    return lines
