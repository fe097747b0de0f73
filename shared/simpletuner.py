"""What SimpleTuner's keys mean here: its other spellings, its defaults where ours differ (and why), the
values we map or refuse, and which unused keys would change what is trained. Each key's own relation to
SimpleTuner (its default, other spellings) is declared with the key, in shared/config_keys.py.

A shared key means what it means in SimpleTuner (its option registry, `simpletuner_sdk/server/services/
field_registry/sections/*.py`, and `documentation/OPTIONS.md` / `DATALOADER.md`), or the run says so:
`DIFFERENCES` is printed once at the start of `prep validate` and `train run`, and listed in README.
"""

from __future__ import annotations

from shared.config_declare import differences, same_defaults
from shared.config_keys import DatasetConfig, TrainConfig
from shared.errors import UserError

# Defaults we deliberately do not share, and those we do: from the keys' declarations.
DIFFERENCES = differences(TrainConfig, DatasetConfig)
SAME_DEFAULTS = same_defaults(TrainConfig, DatasetConfig)

# Values SimpleTuner documents that mean the same here.
OPTIMIZER_NAMES = {
    "adamw_bf16": "adamw",
    "optimi-adamw": "adamw",
    "torch-adamw": "adamw",
    "bnb-adamw8bit": "bnb-adamw8bit",
    "adamw": "adamw",
}
DEFAULT_OPTIMIZER = "adamw_bf16"  # SimpleTuner's registry default
# Each optimizer's own settings in SimpleTuner (`helpers/training/optimizer_param.py`, `default_settings`):
# (beta1, beta2), eps, weight decay. "adamw" is ours: torch's AdamW with torch-adamw's settings.
OPTIMIZER_SETTINGS = {
    "adamw_bf16": ((0.9, 0.999), 1e-6, 1e-2),
    "optimi-adamw": ((0.9, 0.99), 1e-6, 0.0),
    "bnb-adamw8bit": ((0.9, 0.999), 1e-6, 1e-2),
    "torch-adamw": ((0.9, 0.999), 1e-8, 1e-2),
    "adamw": ((0.9, 0.999), 1e-8, 1e-2),
}
# SimpleTuner passes these to DeepSpeed's optimizer only; without DeepSpeed they change nothing there.
DEEPSPEED_ONLY_KEYS = {"adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon"}


def schedule_notes(lr_scheduler: str) -> list[str]:
    """What SimpleTuner 4.10's schedules of these names do that ours do not (`custom_schedule.py`)."""
    ours = "here a linear warm-up over lr_warmup_steps, then one cosine decay to 0 over the run"
    notes = {
        "cosine": "lr_scheduler cosine: SimpleTuner's has no warm-up and swings between the rate and lr_end with a "
        "half-period of lr_warmup_steps (1000 when 0), over and over; " + ours,
        "cosine_with_restarts": "lr_scheduler cosine_with_restarts: SimpleTuner 4.10's keeps the rate constant (it "
        "warns that it misbehaves); " + ours + " (one cycle)",
    }
    return [notes[lr_scheduler]] if lr_scheduler in notes else []


def deepspeed_only_note(key: str) -> str:
    return (
        f"{key}: SimpleTuner applies it only under DeepSpeed (its optimizer's own setting otherwise); here it is "
        "not applied either: set optimizer_beta1 and optimizer_beta2, or optimizer_config (eps=..., weight_decay=...)"
    )


def optimizer_settings(
    name: str, beta1: float, beta2: float, optimizer_config: str, where: str
) -> tuple[tuple[tuple[float, float], float, float], list[str]]:
    """((beta1, beta2), eps, weight decay) of optimizer `name` as SimpleTuner resolves them: the optimizer's
    own settings, `optimizer_config` ("eps=1e-6,weight_decay=0.0") over them, and `optimizer_beta1` with
    `optimizer_beta2` (only both: -1 is unset) over the betas; and notes on what we do not apply."""
    betas, eps, weight_decay = OPTIMIZER_SETTINGS.get(name, OPTIMIZER_SETTINGS["adamw"])
    notes = []
    for item in filter(None, (part.strip() for part in optimizer_config.split(","))):
        key, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if key.strip() in ("eps", "weight_decay") and number is not None:
            eps, weight_decay = (number, weight_decay) if key.strip() == "eps" else (eps, number)
        elif key.strip() in ("eps", "weight_decay"):
            raise UserError(f"{where}: key 'optimizer_config' sets {key.strip()} to {value!r}; expected a number")
        else:
            notes.append(
                f"optimizer_config: SimpleTuner passes {item!r} to its optimizer; here only eps and weight_decay "
                "are applied (AdamW has no such setting, or it is fixed)"
            )
    if beta1 >= 0 and beta2 >= 0:
        betas = (beta1, beta2)
    elif beta1 >= 0 or beta2 >= 0:  # SimpleTuner stops too: "Both ... should be provided"
        raise UserError(f"{where}: set both optimizer_beta1 and optimizer_beta2 (SimpleTuner needs both), or neither")
    return (betas, eps, weight_decay), notes


# Values SimpleTuner documents that we refuse, with what to write instead.
REFUSED_VALUES = {
    ("optimizer", "*"): "use adamw (or adamw_bf16, which means it here) or bnb-adamw8bit",
    ("lr_scheduler", "sine"): "use cosine (the nearest: a smooth decay)",
    ("lora_type", "lycoris"): "LyCORIS adapters are not supported yet; use lora_type standard (PEFT LoRA)",
    ("base_model_precision", "*"): "use no_change, int8-quanto, fp8-quanto, fp8uz-quanto, int4-quanto, int2-quanto or "
    "nf4-bnb",
}

# Keys we do not use that would change what is trained: reported loudly.
TRAINING_KEYS = {
    "snr_gamma",
    "use_soft_min_snr",
    "noise_offset",
    "noise_offset_probability",
    "input_perturbation",
    "input_perturbation_steps",
    "loss_type",
    "huber_schedule",
    "huber_c",
    "flow_use_beta_schedule",
    "flow_beta_schedule_alpha",
    "flow_beta_schedule_beta",
    "flow_sigmoid_scale",
    "timestep_bias_strategy",
    "timestep_bias_begin",
    "timestep_bias_end",
    "timestep_bias_multiplier",
    "timestep_bias_portion",
    "use_dora",
    "lora_init_type",
    "init_lora",
    "lycoris_config",
    "train_text_encoder",
    "text_encoder_lr",
    "lr_num_cycles",
    "lr_scale",
    "lr_scale_sqrt",
    "gradient_precision",
    "masked_loss_probability",
    "ema_update_interval",
    "prepend_instance_prompt",
    "only_instance_prompt",
    "caption_shuffle",
    "maximum_image_size",
    "target_downsample_size",
    "minimum_aspect_ratio",
    "maximum_aspect_ratio",
    "crop_aspect_buckets",
    "max_upscale_threshold",
    "max_num_samples",
    "timestep_sampling_offset",
    "model_type",  # full fine-tunes are not supported: refused where read
    "allow_dataset_oversubscription",
    "data_backend_sampling",
    "disable_multiline_split",
    "fuse_qkv_projections",
    "tread_config",
    "is_regularisation_data",  # SimpleTuner's target is then the base model's own prediction
    "is_regularization_data",
    "vae_cache_clear_each_epoch",  # SimpleTuner re-encodes (and re-crops) each epoch; a cache here is made once
    "train_batch_size",  # in a dataset entry: SimpleTuner batches that dataset's samples by it
    "layer_freeze_strategy",  # config.env's USE_BITFIT
}


def classify_ignored(keys: list[str]) -> tuple[list[str], list[str]]:
    """("file: key" lines for keys that change training, the rest): the first are reported loudly."""
    loud = [k for k in keys if k.rsplit(": ", 1)[-1] in TRAINING_KEYS]
    return loud, [k for k in keys if k not in loud]


def differences_report() -> list[str]:
    """The lines printed once at the start of `prep validate` and `train run`."""
    return ["defaults that differ from SimpleTuner's (set the key to choose):"] + [d.line() for d in DIFFERENCES]
