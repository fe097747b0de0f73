"""Every key of `config.json` and of a `multidatabackend.json` entry, each declared once: its default, what it
means, the values it takes, its other SimpleTuner spellings and how its default compares with SimpleTuner's
(`shared/config_declare.py` says how). A key means what it means in SimpleTuner unless its declaration says
otherwise; the README's key tables are generated from here (`python -m shared.config_keys` rewrites them).

Adding a key: declare it here, read it where it is used; the README table follows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from shared.config_declare import SAME, above, at_least, between, differs, every_n_steps, key, key_table
from shared.flavours import FLAVOURS

BASE_MODEL_PRECISIONS = (
    "no_change",
    "int8-quanto",
    "fp8-quanto",
    "fp8uz-quanto",
    "int4-quanto",
    "int2-quanto",
    "nf4-bnb",  # bitsandbytes, an optional extra: pip install 'qwen-edit-trainer[bnb]'
)
# lora_target's presets: the transformer blocks' module names (suffixes) each adapts.
_ATTENTION_IMAGE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
_ATTENTION_TEXT = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_MLPS = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
LORA_TARGETS = {
    "attention_image": _ATTENTION_IMAGE,
    "attention": _ATTENTION_IMAGE + _ATTENTION_TEXT,
    "attention_mlp": _ATTENTION_IMAGE + _ATTENTION_TEXT + _MLPS,
}
MEMORY_MODES = ("fast", "balanced", "low", "minimal")  # fastest first: `auto` takes the first that fits
SEED_LIMIT = 2**63 - 1024  # torch seeds are 64-bit; each process adds its index to the seed
CAPTION_STRATEGIES = ("textfile", "filename", "instanceprompt", "parquet")
RESOLUTION_TYPES = ("pixel_area", "area", "pixel")
SS = "scheduled sampling (train/rollout.py): "


@dataclass
class TrainConfig:
    """Training options from `config.json` (SimpleTuner names and meanings)."""

    model_type: str = key(
        "lora",
        "what is trained",
        choices=("lora",),
        simpletuner=differs("full (a full fine-tune)", "this trainer trains LoRAs; full is refused"),
    )
    model_family: str = key("qwen_image", "the model family", choices=("qwen_image",))
    model_flavour: str = key(
        "edit-v1",
        "edit-v1 (Qwen-Image-Edit), edit-v2 (2509: 1-3 pictures), edit-v2+ and edit-v3 (2511): edit-v2's "
        "encodings with zero_cond_t (reference tokens modulated with timestep 0); unset: what the weights are",
        choices=tuple(FLAVOURS),
        simpletuner=differs(
            "v2.1 (Qwen-Image 2.1, text to image)",
            "this trainer trains edit models",
            ours="what the weights at pretrained_model_name_or_path are (their pipeline class), else edit-v1",
        ),
    )
    pretrained_model_name_or_path: str = key("", "hub id or local diffusers folder; empty: the flavour's checkpoint")
    output_dir: str = key("output", "where checkpoints, logs, previews and the LoRA go")
    data_backend_config: str = key("", "the multidatabackend.json listing the datasets (required)")
    train_batch_size: int = key(
        1,
        "samples per step on each GPU; a batch holds samples of one shape",
        range=at_least(1),
        simpletuner=differs(
            "4", "one 1024² edit sample with its references fills a 24-80 GB card; raise it or accumulate gradients"
        ),
    )
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step", range=at_least(1), simpletuner=SAME)
    learning_rate: float = key(
        1e-4,
        "the optimizer's rate (after warm-up)",
        range=above(0),
        simpletuner=differs("4e-7 (a full fine-tune's rate)", "a LoRA rate; SimpleTuner's Qwen edit guide sets one"),
    )
    lr_scheduler: str = key(
        "constant_with_warmup",
        "the rate's schedule, in optimizer steps (a run resumed on another number of GPUs keeps its rate); "
        "cosine and cosine_with_restarts: a warm-up, then one cosine decay to 0 (said at the start of a run)",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
        simpletuner=SAME,
    )
    lr_warmup_steps: int = key(0, "optimizer steps of linear warm-up", range=at_least(0), simpletuner=SAME)
    lr_end: float = key(4e-7, "polynomial: the rate it decays to", simpletuner=SAME)
    lr_power: float = key(0.8, "polynomial: its power", simpletuner=SAME)
    max_train_steps: int = key(
        0, "optimizer steps to train; wins when > 0", range=at_least(0, "0: use num_train_epochs"), simpletuner=SAME
    )
    num_train_epochs: int = key(1, "passes over the data when max_train_steps is 0", simpletuner=SAME)
    lora_rank: int = key(16, "the LoRA's rank", range=at_least(1), simpletuner=SAME)
    lora_alpha: float = key(
        0.0, "the LoRA's alpha (its scale is alpha / rank); 0 or unset: lora_rank", range=above(0), simpletuner=SAME
    )
    lora_dropout: float = key(
        0.0,
        "dropout on the LoRA's input",
        range=between(0, 1, "[)"),
        simpletuner=differs(
            "0.1",
            "dropout keeps a dropped copy of every adapted layer's input for backward, an estimated 0.35 GiB per "
            "un-checkpointed block at 1024² edit-v1 that the memory plan would pay for in speed; set it to use dropout",
        ),
    )
    lora_type: str = key(
        "standard",
        "PEFT LoRA, initialised as SimpleTuner's default (lycoris is refused)",
        choices=("standard",),
        simpletuner=SAME,
    )
    lora_target: str = key(
        "attention_image",
        "the modules adapted: attention_image (the image stream's to_q, to_k, to_v, to_out.0), attention (both "
        "streams), attention_mlp (and the MLPs), or a list of module names",
        choices=tuple(LORA_TARGETS),
        simpletuner=SAME,
        also=("peft_lora_target_modules",),
    )
    mixed_precision: str = key("bf16", "bf16 autocast, or no (fp32)", choices=("bf16", "no"), simpletuner=SAME)
    gradient_checkpointing: bool = key(
        False,
        "set: checkpoint every block, as SimpleTuner; unset: memory_mode decides",
        simpletuner=differs(
            "true (every block)",
            "the same gradients, faster; set it to true for SimpleTuner's behaviour",
            ours="unset: memory_mode checkpoints as many blocks as memory needs",
        ),
    )
    gradient_checkpointing_interval: int = key(
        1, "checkpoint every n-th block (set: wins over the mode)", range=at_least(1)
    )
    selective_checkpointing: bool = key(True, "checkpointed blocks keep attention's outputs; unset: on when it fits")
    memory_mode: str = key(
        "auto",
        "how the step trades speed for memory (README: Memory and speed); auto: the fastest that fits",
        choices=("auto", *MEMORY_MODES),
    )
    memory_budget_gib: float = key(0.0, "GPU memory the step may use", range=at_least(0, "0: the free memory"))
    blocks_to_swap: int = key(
        0, "blocks whose frozen weights stay in pinned host memory; unset: the mode decides", range=at_least(0)
    )
    offload_activations: bool = key(
        False, "checkpointed blocks keep their inputs in host memory; unset: the mode decides"
    )
    compile_blocks: bool = key(
        False, "torch.compile each block; unset: on with a GPU (off for int4-quanto and fp8uz-quanto)"
    )
    prefer_cudnn_attention: bool = key(True, "attention through cuDNN first, then flash")
    base_model_precision: str = key(
        "no_change",
        "the frozen transformer's weights: bf16 (no_change), optimum-quanto's int8/fp8/int4/int2, or bitsandbytes "
        "NF4 (`pip install 'qwen-edit-trainer[bnb]'`; its blocks are never swapped)",
        choices=BASE_MODEL_PRECISIONS,
    )
    quantize_via: str = key(
        "accelerator", "where weights are quantised", choices=("cpu", "accelerator"), simpletuner=SAME
    )
    flow_schedule_shift: float = key(3.0, "static σ shift (SimpleTuner's examples use 1.73)", simpletuner=SAME)
    flow_schedule_auto_shift: bool = key(False, "resolution-dependent σ shift, as the model's scheduler does")
    flow_use_uniform_schedule: bool = key(False, "σ uniform in (0, 1) instead of logit-normal")
    logit_mean: float = key(0.0, "logit-normal σ: the mean of the normal before the sigmoid")
    logit_std: float = key(1.0, "logit-normal σ: its standard deviation")
    loss_weighting: str = key(
        "none",
        "per-σ loss weight: sigma_sqrt (σ^-2), cosmap (as diffusers' SD3 scripts)",
        choices=("none", "sigma_sqrt", "cosmap"),
    )
    caption_dropout_probability: float = key(
        0.1,
        "chance a sample trains on the empty instruction (cached when > 0)",
        range=between(0, 1, "[)"),
        simpletuner=SAME,
    )
    scheduled_sampling_max_step_offset: int = key(
        0,
        SS + "timesteps a sample may start above its own and roll back down; 0: off",
        range=between(0, 999),
        simpletuner=SAME,
    )
    scheduled_sampling_probability: float = key(
        0.0, SS + "chance a sample is rolled out", range=between(0, 1), simpletuner=SAME
    )
    scheduled_sampling_prob_start: float = key(
        0.0, SS + "with ramp_steps, the chance ramps from this (0: probability)", range=between(0, 1), simpletuner=SAME
    )
    scheduled_sampling_prob_end: float = key(
        0.5, SS + "... to this (0: probability)", range=between(0, 1), simpletuner=SAME
    )
    scheduled_sampling_ramp_steps: int = key(
        0, SS + "optimizer steps the ramp takes", range=at_least(0, "0: no ramp"), simpletuner=SAME
    )
    scheduled_sampling_start_step: int = key(0, SS + "the step the ramp starts at", range=at_least(0), simpletuner=SAME)
    scheduled_sampling_ramp_shape: str = key(
        "linear", SS + "the ramp's shape", choices=("linear", "cosine"), simpletuner=SAME
    )
    scheduled_sampling_strategy: str = key(
        "uniform", SS + "how offsets are drawn", choices=("uniform", "biased_early", "biased_late"), simpletuner=SAME
    )
    scheduled_sampling_sampler: str = key(
        "unipc",
        SS + "SimpleTuner's solver for ε/v models; flow models take Euler steps",
        choices=("unipc", "euler", "dpm"),
        simpletuner=SAME,
    )
    scheduled_sampling_order: int = key(2, SS + "that solver's order", range=between(1, 9), simpletuner=SAME)
    scheduled_sampling_reflexflow: bool = key(True, SS + "ReflexFlow weighting and direction term", simpletuner=SAME)
    scheduled_sampling_reflexflow_alpha: float = key(1.0, SS + "ReflexFlow's alpha", simpletuner=SAME)
    scheduled_sampling_reflexflow_beta1: float = key(10.0, SS + "ReflexFlow's beta1", simpletuner=SAME)
    scheduled_sampling_reflexflow_beta2: float = key(1.0, SS + "ReflexFlow's beta2", simpletuner=SAME)
    optimizer: str = key(
        "adamw",
        "adamw (torch's fused AdamW; SimpleTuner's adamw_bf16, optimi-adamw and torch-adamw mean it, with their "
        "settings) or bnb-adamw8bit (needs bitsandbytes)",
        choices=("adamw", "bnb-adamw8bit"),
        simpletuner=differs(
            "adamw_bf16 (bf16 weights, stochastic rounding)",
            "the same algorithm at higher precision; adamw_bf16 is accepted and means this",
            ours="adamw (torch's fused AdamW on fp32 LoRA weights, with adamw_bf16's betas (0.9, 0.999), eps 1e-6 "
            "and weight decay 1e-2)",
        ),
    )
    use_ema: bool = key(False, "keep an EMA of the LoRA (exported to ema/ beside it)", simpletuner=SAME)
    ema_device: str = key("cpu", "where the EMA lives", choices=("cpu", "accelerator"), simpletuner=SAME)
    ema_decay: float = key(
        0.995, "the EMA's decay (warmed up as diffusers' EMAModel)", range=between(0, 1, "()"), simpletuner=SAME
    )
    checkpointing_steps: int = every_n_steps(
        500, "a checkpoint", "no checkpoints", simpletuner=SAME, also=("checkpoint_step_interval",)
    )
    checkpoints_total_limit: int = key(
        5, "checkpoints kept (the oldest go)", range=at_least(0, "0: keep all"), simpletuner=SAME
    )
    resume_from_checkpoint: str = key("", "latest (this run's newest readable checkpoint) or a checkpoint dir")
    overwrite_output_dir: bool = key(
        False, "start a new run in an output_dir that holds another (train run --overwrite)"
    )
    max_nonfinite_steps: int = key(5, "NaN/inf losses in a row before training stops", range=at_least(1))
    report_to: str = key(
        "none",
        "trackers: tensorboard, wandb (`pip install 'qwen-edit-trainer[wandb]'`; WANDB_MODE=offline keeps it "
        "local), all; a CSV and loss.png are always written",
        choices=("none", "tensorboard", "wandb", "all"),
        simpletuner=SAME,
    )
    tracker_project_name: str = key("simpletuner", "the W&B project", simpletuner=SAME)
    tracker_run_name: str = key("simpletuner-testing", "the W&B run (a resumed run continues it)", simpletuner=SAME)
    max_grad_norm: float = key(
        2.0,
        "the gradient clipping threshold (grad_clip_method says how)",
        range=at_least(0, "0: no clipping"),
        simpletuner=SAME,
    )
    grad_clip_method: str = key(
        "norm",
        "norm: all LoRA gradients scaled together to a norm of at most max_grad_norm; value: each element "
        "clipped to ±max_grad_norm",
        choices=("norm", "value"),
        simpletuner=differs("value", "scaling the norm keeps the update's direction; set value for SimpleTuner's"),
    )
    optimizer_beta1: float = key(-1.0, "with optimizer_beta2 (both or neither): the optimizer's betas; -1: unset")
    optimizer_beta2: float = key(-1.0, "see optimizer_beta1")
    optimizer_config: str = key(
        "", "the optimizer's other settings, as SimpleTuner writes them: eps=1e-6,weight_decay=0"
    )
    # The AdamW settings a run uses, resolved as SimpleTuner resolves them (shared/simpletuner.py,
    # `optimizer_settings`): not keys of their own (SimpleTuner reads adam_* only under DeepSpeed).
    adam_beta1: float = key(0.9, "resolved from optimizer, optimizer_config and optimizer_beta1/2; not read")
    adam_beta2: float = key(0.999, "as adam_beta1")
    adam_weight_decay: float = key(1e-2, "as adam_beta1")
    adam_epsilon: float = key(1e-6, "as adam_beta1")
    seed: int = key(
        0,
        "training randomness (σ, noise, order, dropout); never invalidates a cache",
        range=between(0, SEED_LIMIT, "[)", text="an integer in [0, 2**63 - 1024)"),
        simpletuner=differs(
            "unset: a new random seed every run (42 in older versions)",
            "runs repeat exactly unless you set another seed",
        ),
    )
    prep_engine: str = key(
        "local",
        "prep build-cache: this machine's GPUs (local) or a Ray cluster (ray; --engine)",
        choices=("local", "ray"),
    )
    ray_address: str = key(
        "", "prep_engine ray: the cluster to join (--ray-address); empty: RAY_ADDRESS, else a local Ray"
    )
    crop_seed: int = key(
        0,
        "prep: seeds crop_style random",
        range=between(0, 2**63, "[)", text="an integer in [0, 2**63)"),
        simpletuner=differs(
            "crops seeded by seed", "so a new training seed never re-encodes a cache", ours="crops seeded by crop_seed"
        ),
    )
    dataloader_num_workers: int = key(
        2, "processes reading the cache ahead of the GPU (0: in the training process)", range=at_least(0)
    )
    dataloader_prefetch_factor: int = key(2, "batches each worker reads ahead", range=at_least(1))
    eval_dataset_id: str = key("", "a main dataset held out for evaluation (cached as eval, not trained on)")
    # Dataset settings an entry of multidatabackend.json falls back to when it has none (as in SimpleTuner).
    caption_strategy: str = key(
        "",
        "what a dataset entry without its own uses",
        choices=CAPTION_STRATEGIES,
        simpletuner=differs(
            "the global caption_strategy, else filename (captions from file names)",
            "edit pairs carry their instruction in a .txt file, as the Qwen edit guide's datasets do",
            ours="the global caption_strategy, else textfile (the .txt beside each image)",
        ),
    )
    resolution: float = key(1024, "what a dataset entry without its own uses", simpletuner=SAME)
    resolution_type: str = key(
        "pixel_area", "what a dataset entry without its own uses", choices=RESOLUTION_TYPES, simpletuner=SAME
    )
    minimum_image_size: float = key(0, "what a dataset entry without its own uses")
    conditioning_multidataset_sampling: str = key(
        "combined",
        "with several reference datasets: combined (every sample with all its references) or random (each train "
        "sample with one of them, picked each time it is drawn, with the instruction encoded with that one; "
        "eval samples: all)",
        choices=("combined", "random"),
        simpletuner=differs(
            "random (a sample with several reference datasets trains with one of them, picked per sample)",
            "the Qwen edit guide's multi-reference layout: Plus pipelines take up to 3 pictures at once; "
            "set random for SimpleTuner's behaviour (it changes nothing with one reference dataset)",
            ours="combined (every sample trains with all its references)",
        ),
    )
    eval_holdout: int = key(
        4,
        "no eval_dataset_id: samples each main dataset holds out for evaluation (at most 1 in 8 unless set)",
        range=at_least(0, "0: hold nothing out"),
    )
    validation_step_interval: int = every_n_steps(
        100, "previews and the held-out loss", "previews at start and end", simpletuner=SAME, also=("validation_steps",)
    )
    validation_num_inference_steps: int = key(
        30, "flow-matching Euler steps per preview", range=at_least(1), simpletuner=SAME
    )
    validation_guidance: float = key(
        4.0,
        "true CFG scale of the previews (these checkpoints have no guidance embedding)",
        range=at_least(0),
        simpletuner=differs(
            "7.5", "Qwen-Image-Edit has no guidance embedding; its guide recommends 3.5-4.5 of true CFG"
        ),
    )
    validation_negative_prompt: str = key(
        "",
        "prep: the negative instruction encoded with each eval sample's references",
        simpletuner=differs(
            '"blurry, cropped, ugly"',
            "the true-CFG negative the Qwen edit pipelines' examples use",
            ours='"" (the empty instruction)',
        ),
    )
    validation_resolution: float = key(
        0,
        "prep: eval samples' pixel_area resolution (1024, 1024x1024, 1280x768: that area, each sample's aspect "
        "kept; several: the first, said loudly)",
        range=at_least(0, "0: their dataset's resolution"),
    )
    validation_seed: int = key(
        -1, "the previews' noise", range=between(-1, SEED_LIMIT, "[)", text="-1 (the seed) or an integer below 2**63")
    )
    validation_num_images: int = key(4, "previews render at most this many eval samples", range=at_least(0))
    validation_disable: bool = key(False, "no previews (the held-out loss still runs)")
    disable_benchmark: bool = key(False, "no step-0 preview of the base model (LoRA off)")
    eval_steps_interval: int = every_n_steps(0, "the held-out loss", "every validation_step_interval")
    eval_timesteps: int = key(
        8,
        "σ values the held-out loss is measured at (quantiles of the training σ density)",
        range=at_least(1),
        simpletuner=differs(
            "28", "8 σ quantiles cost 8 forwards per eval sample instead of 28; set 28 for SimpleTuner's"
        ),
    )
    logging_steps: int = key(
        10, "metrics reach the CSV, TensorBoard and the progress bar every n steps (one host sync)", range=at_least(1)
    )
    model_kwargs: dict = key(
        {}, "match_target_res (edit-v2, edit-v2+, edit-v3): encode references with the VAE at the target's size"
    )

    @property
    def preview_settings(self) -> dict:
        """What prep caches differently for eval samples: their negative instruction and resolution."""
        return {"negative_prompt": self.validation_negative_prompt, "resolution": self.validation_resolution}

    @property
    def match_target_res(self) -> bool:
        return bool(self.model_kwargs.get("match_target_res", False))

    @property
    def lora_modules(self) -> list[str]:
        """The module names (suffixes) the LoRA adapts: `lora_target`'s preset, or its list."""
        return list(self.lora_target) if isinstance(self.lora_target, list) else LORA_TARGETS[self.lora_target]


@dataclass
class DatasetConfig:
    """One entry of `multidatabackend.json`."""

    id: str = key(meaning="the dataset's unique name")
    dataset_type: str = key(
        "image",
        "image (main), conditioning (references; implied by conditioning_type), eval (a main dataset held out, as "
        "eval_dataset_id); text_embeds, image_embeds, conditioning_image_embeds: SimpleTuner's cache locations, "
        "accepted with a note (each main dataset's one cache holds them)",
        choices=("image", "conditioning", "eval", "text_embeds", "image_embeds", "conditioning_image_embeds"),
    )
    type: str = key("local", "where the files are", choices=("local",))
    instance_data_dir: str = key("", "the folder of images (and captions)")
    caption_strategy: str = key(
        "textfile",
        "textfile (the .txt beside each image), filename, instanceprompt (+ instance_prompt), parquet (+ parquet)",
        choices=CAPTION_STRATEGIES,
    )
    instance_prompt: str = key("", "caption_strategy instanceprompt: every sample's instruction")
    resolution: float = key(
        1024, "pixel_area: that edge's square area; area: megapixels; pixel: shorter edge", simpletuner=SAME
    )
    resolution_type: str = key(
        "pixel_area", "the unit of resolution and minimum_image_size", choices=RESOLUTION_TYPES, simpletuner=SAME
    )
    conditioning_data: list = key([], "main datasets: the ids of their reference datasets, in order")
    conditioning_type: str = key(
        "reference_strict",
        "reference_strict: the reference gets the target's exact resize and crop; reference_loose: sized on its own",
        choices=("reference_strict", "reference_loose"),
    )
    conditioning_image_embeds: str = key("", "SimpleTuner's embed cache id: accepted, our one cache holds them")
    match: str = key(
        "path",
        "reference datasets: same relative path, or same stem (the extension may differ)",
        choices=("path", "stem"),
    )
    parquet: dict = key({}, "caption_strategy parquet: path (a .parquet or .jsonl), filename_column, caption_column")
    minimum_image_size: float = key(0, "smaller images are left out, named (resolution_type units; 0: no minimum)")
    max_image_pixels: int = key(178_956_970, "larger images are refused (a decompression-bomb guard)")
    allow_links_outside: bool = key(
        False, "read files reached through symbolic links that lead outside instance_data_dir (refused unless set)"
    )
    crop: bool = key(False, "crop to the bucket (false: resize only)", simpletuner=SAME)
    crop_style: str = key(
        "random", "with crop: where the crop is taken", choices=("center", "random"), simpletuner=SAME
    )
    crop_aspect: str = key("square", "with crop: the crop's shape", choices=("preserve", "square"), simpletuner=SAME)
    cache_dir: str = key(
        "", "where this main dataset's cache goes: a folder or an fsspec URL (s3://, gs://); empty: cache/<id>"
    )
    cache_dir_vae: str = key("", "used when cache_dir is empty, as cache_dir")
    disabled: bool = key(False, "skip this entry", also=("disable",))
    repeats: int = key(0, "extra passes over this dataset per epoch", range=at_least(0), simpletuner=SAME)
    probability: float = key(
        0.0,
        "how likely the next batch comes from here (0: unset, 1.0); orders the mix, never repeats",
        range=at_least(0),
    )


def readme_with_tables(readme: str) -> str:
    """`readme` with its two generated key tables replaced by the declarations' (between their markers)."""
    for name, cls in (("config.json", TrainConfig), ("multidatabackend.json", DatasetConfig)):
        begin = f"<!-- {name} keys: generated by `python -m shared.config_keys` from shared/config_keys.py -->"
        end = f"<!-- end of {name} keys -->"
        head, found, rest = readme.partition(begin)
        if not found or end not in rest:
            raise ValueError(f"README has no {begin} ... {end} block")
        readme = head + begin + "\n" + "\n".join(key_table(cls)) + "\n" + end + rest.split(end, 1)[1]
    return readme


if __name__ == "__main__":
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    readme.write_text(readme_with_tables(readme.read_text()))
