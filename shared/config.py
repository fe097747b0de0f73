"""Load a SimpleTuner-style `config.json` + `multidatabackend.json` into typed objects.

Keys we do not use are collected in `Config.ignored` (reported once by the CLI), never an
error: users bring configs from SimpleTuner unchanged. A key we use with a bad value is a
`UserError` naming the file, the dataset id (for dataset entries) and the key.

Keys may be written with or without SimpleTuner's leading `--`. Relative paths are taken
relative to the directory the command runs in, as SimpleTuner does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shared import simpletuner
from shared.config_checks import check_datasets, check_ranges, validation_resolution_area
from shared.config_files import expand_placeholders, read_config_file
from shared.config_values import SIZE_KEYS, fill_fields
from shared.errors import UserError
from shared.flavours import FLAVOURS, flavour_of_weights

BASE_MODEL_PRECISIONS = (
    "no_change",
    "int8-quanto",
    "fp8-quanto",
    "fp8uz-quanto",
    "int4-quanto",
    "int2-quanto",
    "nf4-bnb",  # bitsandbytes, an optional extra: pip install 'qwen-edit-trainer[bnb]'
)


@dataclass
class TrainConfig:
    """Training options from `config.json` (SimpleTuner names and meanings)."""

    model_type: str = "lora"
    model_family: str = "qwen_image"
    model_flavour: str = "edit-v1"
    pretrained_model_name_or_path: str = ""  # empty: the flavour's official checkpoint
    output_dir: str = "output"
    data_backend_config: str = ""
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"  # with lr_warmup_steps 0: constant
    lr_warmup_steps: int = 0
    lr_end: float = 4e-7  # polynomial: the rate it decays to (SimpleTuner's default)
    lr_power: float = 0.8  # polynomial: its power (SimpleTuner's default)
    max_train_steps: int = 0  # 0: use num_train_epochs
    num_train_epochs: int = 1
    lora_rank: int = 16
    lora_alpha: float = 0.0  # unset: lora_rank (SimpleTuner's default), so the LoRA's scale is 1
    lora_dropout: float = 0.0  # SimpleTuner: 0.1 (shared/simpletuner.py says why not here)
    lora_type: str = "standard"  # PEFT LoRA (SimpleTuner's "lycoris" is refused)
    lora_target: str = "attention_image"  # a preset, or a list of module names (suffixes) to adapt; the default
    # is SimpleTuner's Qwen default: the image stream's to_q, to_k, to_v, to_out.0
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False  # set: every block (SimpleTuner's meaning); unset: memory_mode decides
    gradient_checkpointing_interval: int = 1  # checkpoint every n-th block (SimpleTuner's meaning)
    selective_checkpointing: bool = True  # checkpointed blocks keep attention outputs; unset: on when it fits
    memory_mode: str = "auto"  # "auto", "fast", "balanced", "low", "minimal" (train/memory.py)
    memory_budget_gib: float = 0.0  # GPU memory the step may use; 0: what is free at start
    blocks_to_swap: int = 0  # blocks whose frozen weights stay in pinned host memory; unset: memory_mode decides
    offload_activations: bool = False  # checkpointed blocks keep their inputs in host memory; unset: mode decides
    compile_blocks: bool = False  # torch.compile each block; unset: on with a GPU
    prefer_cudnn_attention: bool = True  # attention through cuDNN first, then flash
    base_model_precision: str = "no_change"
    quantize_via: str = "accelerator"
    flow_schedule_shift: float = 3.0
    flow_schedule_auto_shift: bool = False  # resolution-dependent shift, as the model's scheduler does
    flow_use_uniform_schedule: bool = False  # σ uniform in (0, 1) instead of logit-normal
    logit_mean: float = 0.0  # logit-normal σ: mean and std of the normal before the sigmoid
    logit_std: float = 1.0
    loss_weighting: str = "none"  # "none", "sigma_sqrt" (σ^-2), "cosmap" (as diffusers' SD3 scripts)
    caption_dropout_probability: float = 0.1  # chance a sample trains on the empty instruction
    # Scheduled sampling (SimpleTuner's rollout, train/rollout.py): off while the offset is 0.
    scheduled_sampling_max_step_offset: int = 0  # timesteps a sample may start above its own and roll back down
    scheduled_sampling_probability: float = 0.0  # chance a sample is rolled out (0: none, even with an offset)
    scheduled_sampling_prob_start: float = 0.0  # with ramp_steps: the chance ramps from start (0: probability)
    scheduled_sampling_prob_end: float = 0.5  # ... to end (0: probability)
    scheduled_sampling_ramp_steps: int = 0  # optimizer steps the ramp takes; 0: no ramp
    scheduled_sampling_start_step: int = 0  # the step the ramp starts at
    scheduled_sampling_ramp_shape: str = "linear"  # "linear" or "cosine"
    scheduled_sampling_strategy: str = "uniform"  # offsets: "uniform", "biased_early", "biased_late"
    scheduled_sampling_sampler: str = "unipc"  # SimpleTuner's solver for ε/v models; flow models use Euler steps
    scheduled_sampling_order: int = 2  # that solver's order
    scheduled_sampling_reflexflow: bool = True  # ReflexFlow weighting and direction term (SimpleTuner: on for flow)
    scheduled_sampling_reflexflow_alpha: float = 1.0
    scheduled_sampling_reflexflow_beta1: float = 10.0
    scheduled_sampling_reflexflow_beta2: float = 1.0
    optimizer: str = "adamw"  # "adamw" or "bnb-adamw8bit" (needs bitsandbytes)
    use_ema: bool = False
    ema_device: str = "cpu"  # "cpu" or "accelerator"
    ema_decay: float = 0.995
    checkpointing_steps: int = 500  # 0: no checkpoints
    checkpoints_total_limit: int = 5  # keep at most this many checkpoints; 0: keep all
    resume_from_checkpoint: str = ""  # "latest" or a checkpoint dir
    overwrite_output_dir: bool = False  # start a new run in an output_dir that holds another run
    max_nonfinite_steps: int = 5  # NaN/inf losses in a row before training stops
    report_to: str = "none"  # "none", "tensorboard", "wandb" (optional extra) or "all" (CSVs are always written)
    tracker_project_name: str = "simpletuner"  # Weights & Biases project and run (SimpleTuner's defaults)
    tracker_run_name: str = "simpletuner-testing"
    max_grad_norm: float = 2.0
    optimizer_beta1: float = -1.0  # SimpleTuner's: both set (-1: unset) replace the optimizer's betas
    optimizer_beta2: float = -1.0
    optimizer_config: str = ""  # SimpleTuner's "eps=1e-6,weight_decay=0.0": the optimizer's other settings
    # The AdamW settings a run uses, resolved as SimpleTuner resolves them (shared/simpletuner.py,
    # `optimizer_settings`): not keys of their own (SimpleTuner reads adam_* only under DeepSpeed).
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-6
    seed: int = 0  # training randomness only (σ, noise, order, dropout); never invalidates a cache
    prep_engine: str = "local"  # prep build-cache: "local" (this machine's GPUs) or "ray" (Ray Data; --engine)
    ray_address: str = ""  # prep_engine ray: the cluster to join (--ray-address); "": RAY_ADDRESS, else a local Ray
    crop_seed: int = 0  # prep: seeds `crop_style: random` (SimpleTuner uses `seed`; ours is separate so a new
    # training seed never forces a re-encode)
    dataloader_num_workers: int = 2  # processes reading the cache ahead of the GPU (0: in the training process)
    dataloader_prefetch_factor: int = 2  # batches each worker reads ahead
    eval_dataset_id: str = ""  # a main dataset held out for evaluation (its samples are cached as "eval")
    # Dataset settings an entry of multidatabackend.json falls back to when it has none (as in SimpleTuner).
    caption_strategy: str = ""  # "": textfile (SimpleTuner: filename; said at the start of a run)
    resolution: float = 1024
    resolution_type: str = "pixel_area"
    minimum_image_size: float = 0
    # "combined": every sample trains with all its references; "random": each train sample with one of them,
    # picked anew every time it is drawn (prep caches its embeddings per reference). Eval samples: all.
    conditioning_multidataset_sampling: str = "combined"
    eval_holdout: int = 4  # no eval_dataset_id: samples held out of the training data (at most 1 in 8 unless set)
    # Previews (train/previews.py) and the held-out loss (train/evaluate.py); prep caches what they need.
    validation_step_interval: int = 100  # previews (and the held-out loss) every n steps; 0: start and end only
    validation_num_inference_steps: int = 30  # flow-matching Euler steps per preview
    validation_guidance: float = 4.0  # true CFG scale (these checkpoints have no guidance embedding)
    validation_negative_prompt: str = ""  # prep: the negative instruction encoded with each eval sample's references
    validation_resolution: float = 0  # prep: eval samples' resolution (pixel_area); 0: their dataset's resolution
    validation_seed: int = -1  # noise of the previews; -1: `seed`
    validation_num_images: int = 4  # previews render at most this many eval samples
    validation_disable: bool = False  # no previews (the held-out loss still runs)
    disable_benchmark: bool = False  # no step-0 preview of the base model (LoRA off)
    eval_steps_interval: int = 0  # held-out loss every n steps; 0: every validation_step_interval
    eval_timesteps: int = 8  # σ values the held-out loss is measured at (quantiles of the training σ density)
    logging_steps: int = 10  # metrics reach the CSV / TensorBoard / progress bar every n steps (one host sync)
    model_kwargs: dict = field(default_factory=dict)

    @property
    def preview_settings(self) -> dict:
        """What prep caches differently for eval samples: their negative instruction and resolution."""
        return {"negative_prompt": self.validation_negative_prompt, "resolution": self.validation_resolution}

    @property
    def match_target_res(self) -> bool:
        return bool(self.model_kwargs.get("match_target_res", False))


@dataclass
class DatasetConfig:
    """One entry of `multidatabackend.json`."""

    id: str
    # "image" (main), "conditioning", "eval" (a main dataset held out: see eval_dataset_id); "text_embeds",
    # "image_embeds", "conditioning_image_embeds": SimpleTuner's cache locations, accepted (our one cache holds them)
    dataset_type: str = "image"
    type: str = "local"
    instance_data_dir: str = ""
    caption_strategy: str = "textfile"
    instance_prompt: str = ""
    resolution: float = 1024
    resolution_type: str = "pixel_area"
    conditioning_data: list = field(default_factory=list)
    conditioning_type: str = "reference_strict"
    conditioning_image_embeds: str = ""
    match: str = "path"  # conditioning datasets: "path" (same relative path) or "stem" (extension may differ)
    parquet: dict = field(default_factory=dict)  # caption_strategy "parquet": path, filename_column, caption_column
    minimum_image_size: float = 0  # in resolution_type units; 0: no minimum
    max_image_pixels: int = 178_956_970  # decompression-bomb guard
    # Files reached through symbolic links that lead outside instance_data_dir (images, caption files) are
    # refused unless this is true: a link must not make prep read (and cache) a file from elsewhere by accident.
    allow_links_outside: bool = False
    crop: bool = False
    crop_style: str = "random"  # SimpleTuner's defaults; both matter only with crop: true
    crop_aspect: str = "square"
    cache_dir: str = ""  # a local dir or an fsspec URL (s3://, gs://; train also reads https://)
    cache_dir_vae: str = ""
    disabled: bool = False
    repeats: int = 0  # extra passes over this dataset per epoch
    probability: float = 0.0  # how likely the next batch comes from here (0: unset, 1.0); orders, never repeats


@dataclass
class Config:
    """Everything one `config.json` describes, with the datasets it points to."""

    train: TrainConfig
    datasets: list[DatasetConfig]
    config_path: Path
    backend_path: Path
    ignored: list[str]  # "file: key" for every key we read past
    explicit: set[str] = field(default_factory=set)  # config.json keys the user set (or overrode)
    overridden: set[str] = field(default_factory=set)  # keys set on the command line
    dataset_keys: dict[str, set[str]] = field(default_factory=dict)  # dataset id -> keys its entry sets
    differences: list[str] = field(default_factory=list)  # "key: SimpleTuner ..., here ..." for values set

    def dataset(self, dataset_id: str) -> DatasetConfig:
        return next(d for d in self.datasets if d.id == dataset_id)

    def main_datasets(self) -> list[DatasetConfig]:
        return [d for d in self.datasets if d.dataset_type == "image" and not d.disabled]

    def conditioning_for(self, main: DatasetConfig) -> list[DatasetConfig]:
        """The reference datasets of a main dataset, in the order its `conditioning_data` lists them."""
        return [self.dataset(i) for i in main.conditioning_data]

    def cache_location_for(self, main: DatasetConfig) -> str:
        """The main entry's `cache_dir`, else its `cache_dir_vae`, else `cache/<id>` (DESIGN.md): a path or URL."""
        return main.cache_dir or main.cache_dir_vae or f"cache/{main.id}"


_ALIASES, _DATASET_ALIASES = simpletuner.ALIASES, simpletuner.DATASET_ALIASES
# Dataset types that name where SimpleTuner caches embeddings: our one cache per main dataset holds them.
CACHE_ONLY_TYPES = ("text_embeds", "image_embeds", "conditioning_image_embeds")

# Allowed values for the keys that take one of a few strings.
_CHOICES: dict[str, tuple[str, ...]] = {
    "model_type": ("lora",),
    "model_family": ("qwen_image",),
    "model_flavour": tuple(FLAVOURS),
    "mixed_precision": ("bf16", "no"),
    "base_model_precision": BASE_MODEL_PRECISIONS,
    "memory_mode": ("auto", "fast", "balanced", "low", "minimal"),
    "quantize_via": ("cpu", "accelerator"),
    "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    "lora_type": ("standard",),
    "conditioning_multidataset_sampling": ("combined", "random"),
    "lora_target": ("attention", "attention_image", "attention_mlp"),
    "loss_weighting": ("none", "sigma_sqrt", "cosmap"),
    "prep_engine": ("local", "ray"),
    "scheduled_sampling_ramp_shape": ("linear", "cosine"),
    "scheduled_sampling_strategy": ("uniform", "biased_early", "biased_late"),
    "scheduled_sampling_sampler": ("unipc", "euler", "dpm"),
    "optimizer": ("adamw", "bnb-adamw8bit"),
    "ema_device": ("cpu", "accelerator"),
    "report_to": ("none", "tensorboard", "wandb", "all"),
    "dataset_type": ("image", "conditioning", "eval", "text_embeds", "image_embeds", "conditioning_image_embeds"),
    "type": ("local",),
    "caption_strategy": ("textfile", "filename", "instanceprompt", "parquet"),
    "match": ("path", "stem"),
    "crop_style": ("center", "random"),
    "crop_aspect": ("preserve", "square"),
    "resolution_type": ("pixel_area", "area", "pixel"),
    "conditioning_type": ("reference_strict", "reference_loose"),
}


def one_spelling_per_key(raw: dict[str, Any], where: str | Path, aliases: dict[str, str]) -> dict[str, Any]:
    """Keys by the names used here: SimpleTuner's `--name` (command-line form) and older names (`aliases`)
    read as `name`. One key given under two spellings with different values is refused, naming both."""
    spelled: dict[str, tuple[str, Any]] = {}  # name used here -> (the spelling the file used, its value)
    for key, value in raw.items():
        name = key.removeprefix("--")
        name = aliases.get(name, name)
        if name in spelled and spelled[name][1] != value:
            first, before = spelled[name]
            raise UserError(
                f"{where}: '{first}' ({json.dumps(before, default=str)}) and '{key}' "
                f"({json.dumps(value, default=str)}) set the same key to different values; keep one"
            )
        spelled.setdefault(name, (key, value))
    return {name: value for name, (_, value) in spelled.items()}


def load_config(config_path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read `config.json` and the `multidatabackend.json` it names.

    `overrides` (from CLI flags) replace config keys of the same name for one run.
    """
    config_path = Path(config_path)
    raw = one_spelling_per_key(read_config_file(config_path, expect=dict), config_path, _ALIASES)
    raw.update(overrides or {})
    family = str(raw.get("model_family", TrainConfig.model_family))
    raw = expand_placeholders(raw, {"model_family": family}, str(config_path))
    differences: list[str] = []  # where a value means more in SimpleTuner than we do with it
    if "validation_resolution" in raw:
        raw["validation_resolution"], note = validation_resolution_area(raw["validation_resolution"], config_path)
        differences += [note] if note else []
    optimizer = str(raw.get("optimizer", raw.get("--optimizer")) or simpletuner.DEFAULT_OPTIMIZER)
    for key in simpletuner.DEEPSPEED_ONLY_KEYS & {k.removeprefix("--") for k in raw}:
        raw.pop(key, None), raw.pop(f"--{key}", None)
        differences.append(simpletuner.deepspeed_only_note(key))
    ignored: list[str] = []
    train = fill_fields(TrainConfig(), raw, str(config_path), ignored, _CHOICES)
    differences += simpletuner.schedule_notes(train.lr_scheduler)
    settings, notes = simpletuner.optimizer_settings(
        optimizer, train.optimizer_beta1, train.optimizer_beta2, train.optimizer_config, str(config_path)
    )
    (train.adam_beta1, train.adam_beta2), train.adam_epsilon, train.adam_weight_decay = settings
    differences += notes
    if not train.lora_alpha:
        train.lora_alpha = float(train.lora_rank)
    if train.validation_seed < 0:
        train.validation_seed = train.seed
    if train.lr_scheduler == "constant" and train.lr_warmup_steps:
        train.lr_scheduler = "constant_with_warmup"
    if not train.data_backend_config:
        raise UserError(f"{config_path}: key 'data_backend_config' is missing; set it to your multidatabackend.json")
    weights = flavour_of_weights(train.pretrained_model_name_or_path) if train.pretrained_model_name_or_path else None
    if weights and "model_flavour" not in raw and "--model_flavour" not in raw:
        train.model_flavour = weights  # the weights say which they are
    elif weights and FLAVOURS[weights].plus != FLAVOURS[train.model_flavour].plus:
        differences.append(
            f"model_flavour {train.model_flavour}: the weights at {train.pretrained_model_name_or_path} are "
            f"{FLAVOURS[weights].pipeline_class}'s ({weights}); training would encode and sample as the other "
            "pipeline does (remove model_flavour to follow the weights)"
        )
    elif weights and FLAVOURS[weights].zero_cond_t and not FLAVOURS[train.model_flavour].zero_cond_t:
        differences.append(
            f"model_flavour {train.model_flavour}: the weights at {train.pretrained_model_name_or_path} are 2511's "
            f"({weights}: their transformer modulates the references with timestep 0, zero_cond_t); this flavour "
            "trains without it, unlike inference with these weights (remove model_flavour to follow the weights)"
        )
    if not train.pretrained_model_name_or_path:
        train.pretrained_model_name_or_path = FLAVOURS[train.model_flavour].default_model
    check_ranges(train, config_path)

    backend_path = Path(train.data_backend_config)
    entries = read_config_file(backend_path, expect=list)
    datasets, dataset_keys = [], {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("id"):
            raise UserError(f"{backend_path}: entry {index} has no 'id'; every dataset needs a unique id")
        where = f"{backend_path}: dataset '{entry['id']}'"
        entry = one_spelling_per_key(entry, where, _DATASET_ALIASES)
        variables = {"model_family": train.model_family, "output_dir": train.output_dir, "id": str(entry["id"])}
        entry = expand_placeholders(entry, variables, where)
        if "dataset_type" not in entry and "conditioning_type" in entry:
            entry["dataset_type"] = "conditioning"  # as SimpleTuner's guides write reference datasets
        # Unset dataset settings fall back to the config's global ones, as in SimpleTuner.
        defaults = DatasetConfig(
            id=str(entry["id"]),
            resolution=train.resolution,
            resolution_type=train.resolution_type,
            minimum_image_size=train.minimum_image_size,
            caption_strategy=train.caption_strategy or "textfile",
        )
        dataset = fill_fields(defaults, entry, where, ignored, _CHOICES)
        for key in SIZE_KEYS:  # a fraction means megapixels, which only resolution_type "area" counts in
            if dataset.resolution_type != "area" and not float(getattr(dataset, key)).is_integer():
                raise UserError(
                    f"{where}: key '{key}' is {getattr(dataset, key)!r}, a fraction, but resolution_type is "
                    f"'{dataset.resolution_type}' (pixels); whole pixels, or resolution_type 'area' for megapixels"
                )
        if isinstance(dataset.conditioning_data, str):
            dataset.conditioning_data = [dataset.conditioning_data]
        datasets.append(dataset)
        dataset_keys[dataset.id] = {k for k, v in entry.items() if v is not None}
    _adopt_eval_dataset(train, datasets, backend_path)
    explicit = {k for k, v in raw.items() if k in {f.name for f in fields(TrainConfig)} and v is not None}
    config = Config(
        train, datasets, config_path, backend_path, ignored, explicit, set(overrides or {}), dataset_keys, differences
    )
    check_datasets(config)
    return config


def _adopt_eval_dataset(train: TrainConfig, datasets: list[DatasetConfig], backend_path: Path) -> None:
    """SimpleTuner's `dataset_type: "eval"` entry is a main dataset held out for evaluation: eval_dataset_id."""
    evals = [d for d in datasets if d.dataset_type == "eval" and not d.disabled]
    if len(evals) > 1:
        raise UserError(
            f"{backend_path}: datasets {', '.join(d.id for d in evals)} all have dataset_type 'eval'; one eval "
            "dataset is supported: merge them into one folder, or disable all but one"
        )
    for dataset in evals:
        if train.eval_dataset_id and train.eval_dataset_id != dataset.id:
            raise UserError(
                f"{backend_path}: dataset '{dataset.id}' has dataset_type 'eval' but eval_dataset_id is "
                f"'{train.eval_dataset_id}'; keep one of the two"
            )
        dataset.dataset_type, train.eval_dataset_id = "image", dataset.id
