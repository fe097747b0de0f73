"""The cache's fingerprint: every setting that changes cached bytes, and nothing else.

`prep build-cache` stores it in `cache.json` and the manifest, and refuses to mix samples built
under another one; `train run` recomputes it from its config and refuses a cache built with other
prep settings, saying what differs and how to rebuild. Computed from the model's config files
only: no encoder is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shared.cache.format import FORMAT_VERSION
from shared.config import Config, DatasetConfig
from shared.errors import UserError
from shared.flavours import FLAVOURS

TRAINING_INDEPENDENT = ("dtype",)  # the encoders' precision: prep's choice (bf16 on a GPU, fp32 on CPU)
# Settings recorded here but left out of the hash: they change only the eval samples, whose source hash
# includes them, so a plain rebuild re-encodes just those (no --force).
PER_SAMPLE = ("previews",)


def fingerprint(config: Config, main: DatasetConfig, dtype) -> dict:
    """Everything that changes the cached bytes (and nothing else), and its hash; computed without
    loading the encoders. Training-only keys are left out, so changing them never invalidates a cache."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import AutoConfig

    model = config.train.pretrained_model_name_or_path
    flavour = FLAVOURS[config.train.model_flavour]
    try:
        vae_config = dict(AutoencoderKLQwenImage.load_config(model, subfolder="vae"))
        text_config = AutoConfig.from_pretrained(model, subfolder="text_encoder").to_dict()
    except (OSError, ValueError) as err:
        raise UserError(f"could not read the model config of '{model}': {err}") from None
    weights = (
        sorted(
            (str(p.relative_to(model)), p.stat().st_size)
            for sub in ("vae", "text_encoder", "processor", "tokenizer")
            for p in (Path(model) / sub).glob("*")
            if p.is_file()
        )
        if Path(model).is_dir()
        else []
    )
    datasets = [main, *config.conditioning_for(main)]
    settings = {
        "format_version": FORMAT_VERSION,
        "model": model,
        "model_files": weights,
        "vae_config": {k: v for k, v in vae_config.items() if not k.startswith("_")},
        "text_encoder_config": {k: v for k, v in text_config.items() if not k.startswith("_")},
        "flavour": flavour.name,
        "prompt_template": flavour.vl_text("{}", len(main.conditioning_data)),
        "dtype": str(dtype),
        "match_target_res": config.train.match_target_res,
        "datasets": [_placement_settings(d) for d in datasets],
    }
    if references_alone(config, main):
        settings["conditioning_multidataset_sampling"] = "random"  # train samples: embeddings per reference
    if any(d.crop and d.crop_style == "random" for d in datasets):
        settings["crop_seed"] = config.train.crop_seed  # changes the crops only when they are random
    hashed = dict(settings)
    settings["previews"] = config.train.preview_settings
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()
    return {"sha256": digest, "settings": settings}


def references_alone(config: Config, main: DatasetConfig) -> bool:
    """Whether `main`'s train samples are cached with embeddings per reference (each trains with one reference,
    picked when drawn): `conditioning_multidataset_sampling: random` with more than one reference dataset (with
    one, SimpleTuner's random and combined are the same)."""
    return config.train.conditioning_multidataset_sampling == "random" and len(main.conditioning_data) > 1


def _placement_settings(dataset: DatasetConfig) -> dict:
    """A dataset's settings that place its images. Without `crop`, crop_style and crop_aspect change nothing, so
    they are recorded as the neutral "center" / "preserve" (a cache does not go stale over an unused key)."""
    settings = {k: getattr(dataset, k) for k in ("id", "resolution", "resolution_type", "conditioning_type", "crop")}
    settings["crop_style"] = dataset.crop_style if dataset.crop else "center"
    settings["crop_aspect"] = dataset.crop_aspect if dataset.crop else "preserve"
    return settings


def changed_settings(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The names of the settings that differ between two fingerprints' settings, sorted."""
    return sorted(
        k
        for k in (set(old) | set(new)) - set(ignore)
        if json.dumps(old.get(k), sort_keys=True, default=str) != json.dumps(new.get(k), sort_keys=True, default=str)
    )
