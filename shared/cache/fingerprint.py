"""The cache's fingerprint: every setting that changes cached bytes, and nothing else.

`prep build-cache` stores it in `cache.json` and the manifest, and refuses to mix samples built
under another one. The encoders are named by content (each component's config and the sha256 of
its files), never by the model's path, so a cache travels with its bytes: `train run` on another
machine, with the model elsewhere and only `transformer/` and `vae/` on disk, checks the cache
against what training itself depends on (`training_mismatches`): the settings its config gives,
the VAE's config (the decoder must undo the encoder) and the transformer's input widths.
Computed from config files and file hashes only: no model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shared.cache.format import FORMAT_VERSION
from shared.config import Config, DatasetConfig
from shared.errors import UserError
from shared.file_hashes import file_sha256s
from shared.flavours import FLAVOURS

TRAINING_INDEPENDENT = ("dtype",)  # the encoders' precision: prep's choice (bf16 on a GPU, fp32 on CPU)
# Settings recorded here but left out of the hash: they change only the eval samples, whose source hash
# includes them, so a plain rebuild re-encodes just those (no --force).
PER_SAMPLE = ("previews",)
ENCODER_FOLDERS = ("vae", "text_encoder", "processor", "tokenizer")  # what prep reads of the model


def fingerprint(config: Config, main: DatasetConfig, dtype) -> dict:
    """Everything that changes the cached bytes (and nothing else), and its hash; computed without
    loading the encoders. Training-only keys are left out, so changing them never invalidates a cache."""
    model = config.train.pretrained_model_name_or_path
    settings = {
        **config_settings(config, main),
        "encoders": encoder_files(model),
        "vae_config": vae_config(model),
        "text_encoder_config": _text_encoder_config(model),
        "dtype": str(dtype),
    }
    hashed = {k: v for k, v in settings.items() if k not in PER_SAMPLE}
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()
    return {"sha256": digest, "settings": settings}


def config_settings(config: Config, main: DatasetConfig) -> dict:
    """The fingerprint's settings that the config alone gives (no model file read)."""
    flavour = FLAVOURS[config.train.model_flavour]
    datasets = [main, *config.conditioning_for(main)]
    settings = {
        "format_version": FORMAT_VERSION,
        "flavour": flavour.name,
        "prompt_template": flavour.vl_text("{}", len(main.conditioning_data)),
        "match_target_res": config.train.match_target_res,
        "datasets": [_placement_settings(d) for d in datasets],
        "previews": config.train.preview_settings,
    }
    if _plus_references_resized(config, datasets):
        settings["plus_reference_vae_area"] = flavour.reference_vae_area
    if references_alone(config, main):
        settings["conditioning_multidataset_sampling"] = "random"  # train samples: embeddings per reference
    if any(d.crop and d.crop_style == "random" for d in datasets):
        settings["crop_seed"] = config.train.crop_seed  # changes the crops only when they are random
    return settings


def training_mismatches(config: Config, main: DatasetConfig, built: dict) -> list[str]:
    """What differs between a cache's recorded settings `built` and what training with `config` needs, by
    setting name: the config's own settings, the VAE's config, the transformer's input widths. Reads only
    the transformer's and the VAE's config files, so a training node needs no text encoder."""
    from diffusers import QwenImageTransformer2DModel

    model = config.train.pretrained_model_name_or_path
    expected = {**config_settings(config, main), "vae_config": vae_config(model)}
    recorded = {k: built.get(k) for k in expected}
    changed = changed_settings(recorded, expected)
    try:
        transformer = QwenImageTransformer2DModel.load_config(model, subfolder="transformer")
    except (OSError, ValueError) as err:
        raise UserError(f"could not read the transformer config of '{model}': {err}") from None
    text = built.get("text_encoder_config") or {}
    text_width = (text.get("text_config") or text).get("hidden_size")
    if text_width is not None and transformer.get("joint_attention_dim") != text_width:
        width = transformer.get("joint_attention_dim")
        changed.append(f"transformer joint_attention_dim {width} (cached embeddings: {text_width})")
    z_dim = (built.get("vae_config") or {}).get("z_dim")
    if z_dim is not None and transformer.get("in_channels") != 4 * z_dim:
        changed.append(f"transformer in_channels {transformer.get('in_channels')} (cached latents: 4 x {z_dim})")
    return changed


def references_alone(config: Config, main: DatasetConfig) -> bool:
    """Whether `main`'s train samples are cached with embeddings per reference (each trains with one reference,
    picked when drawn): `conditioning_multidataset_sampling: random` with more than one reference dataset (with
    one, SimpleTuner's random and combined are the same)."""
    return config.train.conditioning_multidataset_sampling == "random" and len(main.conditioning_data) > 1


def _plus_references_resized(config: Config, datasets: list[DatasetConfig]) -> bool:
    """Whether a Plus flavour's references are encoded at ~1 MP where caches before that rule (prep/sample_records.py,
    `reference_vae_size`) encoded them at their datasets' or the eval previews' resolution: only then is the
    rule in the fingerprint, so that such caches are rebuilt and others (every dataset at 1024) stay current."""
    if not FLAVOURS[config.train.model_flavour].plus or config.train.match_target_res:
        return False
    sizes = {(d.resolution, d.resolution_type) for d in datasets}
    preview = config.train.validation_resolution
    return sizes != {(1024, "pixel_area")} or preview not in (0, 1024)


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


def vae_config(model: str) -> dict:
    from diffusers import AutoencoderKLQwenImage

    try:
        config = dict(AutoencoderKLQwenImage.load_config(model, subfolder="vae"))
    except (OSError, ValueError) as err:
        raise UserError(f"could not read the VAE config of '{model}': {err}") from None
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _text_encoder_config(model: str) -> dict:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, subfolder="text_encoder").to_dict()
    except (OSError, ValueError) as err:
        raise UserError(f"could not read the text encoder config of '{model}': {err}") from None
    return {k: v for k, v in config.items() if not k.startswith("_")}


def encoder_files(model: str) -> dict[str, str] | str:
    """{relative path: sha256} of every file of the encoders' folders (a local model), or the hub id."""
    root = Path(model)
    if not root.is_dir():
        return model
    files = sorted(p for sub in ENCODER_FOLDERS for p in (root / sub).glob("*") if p.is_file())
    return {str(p.relative_to(root)): digest for p, digest in zip(files, file_sha256s(files), strict=True)}
