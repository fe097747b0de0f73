"""What SimpleTuner's keys mean here: its other spellings, its defaults where ours differ (and why), the
values we map or refuse, and which unused keys would change what is trained.

A shared key means what it means in SimpleTuner (its option registry, `simpletuner_sdk/server/services/
field_registry/sections/*.py`, and `documentation/OPTIONS.md` / `DATALOADER.md`), or the run says so:
`DIFFERENCES` is printed once at the start of `prep validate` and `train run`, and listed in README.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import UserError

# Older or alternative SimpleTuner names -> the name used here.
ALIASES = {
    "validation_steps": "validation_step_interval",
    "checkpoint_step_interval": "checkpointing_steps",
    "peft_lora_target_modules": "lora_target",
}
DATASET_ALIASES = {"disable": "disabled"}


@dataclass(frozen=True)
class Difference:
    key: str
    simpletuner: str  # SimpleTuner's default (or meaning)
    ours: str
    why: str

    def line(self) -> str:
        return f"  {self.key}: SimpleTuner {self.simpletuner}, here {self.ours} ({self.why})"


# Defaults we deliberately do not share, when the key is omitted.
DIFFERENCES = (
    Difference("model_type", "full (a full fine-tune)", "lora", "this trainer trains LoRAs; full is refused"),
    Difference(
        "model_flavour",
        "v2.1 (Qwen-Image 2.1, text to image)",
        "what the weights at pretrained_model_name_or_path are (their pipeline class), else edit-v1",
        "this trainer trains edit models",
    ),
    Difference(
        "eval_timesteps",
        "28",
        "8",
        "the held-out loss at 8 σ quantiles costs 8 forwards per eval sample instead of 28; set 28 for SimpleTuner's",
    ),
    Difference(
        "caption_strategy",
        "the global caption_strategy, else filename (captions from file names)",
        "the global caption_strategy, else textfile (the .txt beside each image)",
        "edit pairs carry their instruction in a .txt file, as the Qwen edit guide's datasets do",
    ),
    Difference(
        "learning_rate",
        "4e-7 (a full fine-tune's rate)",
        "1e-4",
        "a LoRA rate; SimpleTuner's Qwen edit guide sets one explicitly too",
    ),
    Difference(
        "train_batch_size",
        "4",
        "1",
        "one 1024² edit sample with its references fills a 24-80 GB card; raise it or accumulate gradients",
    ),
    Difference(
        "gradient_checkpointing",
        "true (every block)",
        "unset: memory_mode checkpoints as many blocks as memory needs",
        "the same gradients, faster; set it to true for SimpleTuner's behaviour",
    ),
    Difference(
        "lora_dropout",
        "0.1",
        "0.0",
        "dropout keeps a dropped copy of every adapted layer's input for backward, an estimated 0.35 GiB per "
        "un-checkpointed block at 1024² edit-v1 that the memory plan would pay for in speed; set it to use dropout",
    ),
    Difference(
        "optimizer",
        "adamw_bf16 (bf16 weights, stochastic rounding)",
        "adamw (torch's fused AdamW on fp32 LoRA weights, with adamw_bf16's betas (0.9, 0.999), eps 1e-6 and "
        "weight decay 1e-2)",
        "the same algorithm at higher precision; adamw_bf16 is accepted and means this",
    ),
    Difference(
        "crop_seed",
        "crops seeded by seed",
        "crops seeded by crop_seed",
        "so a new training seed never re-encodes a cache",
    ),
    Difference(
        "conditioning_multidataset_sampling",
        "random (a sample with several reference datasets trains with one of them, picked per sample)",
        "combined (every sample trains with all its references)",
        "the Qwen edit guide's multi-reference layout: Plus pipelines take up to 3 pictures at once; "
        "set random for SimpleTuner's behaviour (it changes nothing with one reference dataset)",
    ),
    Difference(
        "seed",
        "unset: a new random seed every run (42 in older versions)",
        "0",
        "runs repeat exactly unless you set another seed",
    ),
    Difference(
        "validation_negative_prompt",
        '"blurry, cropped, ugly"',
        '"" (the empty instruction)',
        "the true-CFG negative the Qwen edit pipelines' examples use",
    ),
    Difference(
        "validation_guidance",
        "7.5",
        "4.0",
        "Qwen-Image-Edit has no guidance embedding; its guide recommends 3.5-4.5 of true CFG",
    ),
)

# Keys whose default here is SimpleTuner's (checked against its option registry and guides).
SAME_DEFAULTS = {
    "num_train_epochs",
    "max_train_steps",
    "gradient_accumulation_steps",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_end",
    "lr_power",
    "lora_rank",
    "lora_target",  # the image stream's attention (its Qwen DEFAULT_LORA_TARGET)
    "lora_alpha",
    "lora_type",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "max_grad_norm",
    "flow_schedule_shift",
    "caption_dropout_probability",
    "resolution",
    "resolution_type",
    "crop",
    "crop_style",
    "crop_aspect",
    "repeats",
    "use_ema",
    "ema_device",
    "validation_step_interval",
    "validation_num_inference_steps",
    "ema_decay",
    "mixed_precision",
    "quantize_via",  # accelerator (its registry; the Qwen edit guide sets cpu explicitly)
    "report_to",  # "none" in its newest registry ("wandb" in older versions)
    "tracker_project_name",
    "tracker_run_name",
    # scheduled sampling: its option registry's defaults (ReflexFlow: unset there means on for flow models)
    "scheduled_sampling_max_step_offset",
    "scheduled_sampling_probability",
    "scheduled_sampling_prob_start",
    "scheduled_sampling_prob_end",
    "scheduled_sampling_ramp_steps",
    "scheduled_sampling_start_step",
    "scheduled_sampling_ramp_shape",
    "scheduled_sampling_strategy",
    "scheduled_sampling_sampler",
    "scheduled_sampling_order",
    "scheduled_sampling_reflexflow",
    "scheduled_sampling_reflexflow_alpha",
    "scheduled_sampling_reflexflow_beta1",
    "scheduled_sampling_reflexflow_beta2",
}

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
