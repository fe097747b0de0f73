"""SimpleTuner's config.env: a shell file its users `source`, read as that shell would (without running
anything), and its variables mapped to the config keys they set (`simpletuner/helpers/configuration/env_file.py`)."""

from __future__ import annotations

import os
import re

from shared.errors import UserError

# config.env (SimpleTuner's shell-style file): its variable names for the keys we read
# (`simpletuner/helpers/configuration/env_file.py`), and TRAINER_EXTRA_ARGS for the rest.
ENV_KEYS = {
    "RESUME_CHECKPOINT": "resume_from_checkpoint",
    "DATALOADER_CONFIG": "data_backend_config",
    "TRAINING_SEED": "seed",
    "USE_EMA": "use_ema",
    "MINIMUM_RESOLUTION": "minimum_image_size",
    "OUTPUT_DIR": "output_dir",
    "LORA_TYPE": "lora_type",
    "MAX_NUM_STEPS": "max_train_steps",
    "NUM_EPOCHS": "num_train_epochs",
    "CHECKPOINTING_STEPS": "checkpointing_steps",
    "CHECKPOINT_STEP_INTERVAL": "checkpointing_steps",
    "CHECKPOINTING_LIMIT": "checkpoints_total_limit",
    "MODEL_TYPE": "model_type",
    "MODEL_NAME": "pretrained_model_name_or_path",
    "MODEL_FAMILY": "model_family",
    "TRAIN_BATCH_SIZE": "train_batch_size",
    "USE_GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "CAPTION_DROPOUT_PROBABILITY": "caption_dropout_probability",
    "RESOLUTION_TYPE": "resolution_type",
    "RESOLUTION": "resolution",
    "VALIDATION_SEED": "validation_seed",
    "VALIDATION_STEPS": "validation_step_interval",
    "VALIDATION_STEP_INTERVAL": "validation_step_interval",
    "VALIDATION_RESOLUTION": "validation_resolution",
    "VALIDATION_GUIDANCE": "validation_guidance",
    "VALIDATION_NUM_INFERENCE_STEPS": "validation_num_inference_steps",
    "VALIDATION_NEGATIVE_PROMPT": "validation_negative_prompt",
    "DISABLE_BENCHMARK": "disable_benchmark",
    "MIXED_PRECISION": "mixed_precision",
    "OPTIMIZER": "optimizer",
    "LEARNING_RATE": "learning_rate",
    "LR_SCHEDULE": "lr_scheduler",
    "LR_WARMUP_STEPS": "lr_warmup_steps",
    "BASE_MODEL_PRECISION": "base_model_precision",
    "QUANTIZE_VIA": "quantize_via",
    "GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps",
    "LR_END": "lr_end",
    "TRACKER_PROJECT_NAME": "tracker_project_name",
    "TRACKER_RUN_NAME": "tracker_run_name",
    # SimpleTuner's, not read here but named by their key so that those that change training are said loudly
    "USE_DORA": "use_dora",
    "LYCORIS_CONFIG": "lycoris_config",
}


def parse_env_file(text: str, where: str = "config.env") -> dict[str, str]:
    """SimpleTuner's config.env: `[export ]NAME=value` lines (quotes stripped, `#` comments, `NAME+=more`
    appends words); returns the variables. Users source it in a shell, so values are expanded as a shell
    would (`$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`, from the file's earlier lines, then
    the environment; not inside single quotes); a command substitution is refused, never run."""
    variables: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        line = line.removeprefix("export ").strip()
        append = "+=" in line.split("=", 1)[0] + "="
        name, value = line.split("+=", 1) if append else line.split("=", 1)
        name, value = name.strip(), value.strip()
        literal = len(value) >= 2 and value[0] == value[-1] == "'"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if not literal:
            value = _expand(value, variables, f"{where}: {name}")
        variables[name] = f"{variables[name]} {value}".strip() if append and name in variables else value
    return variables


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)(.*))?", re.S)  # NAME, NAME:-default, NAME-default


def _expand(value: str, variables: dict[str, str], where: str) -> str:
    """`value` with shell variables filled in as `sh` would: `$NAME`, `${NAME}`, `${NAME:-default}` (unset or
    empty), `${NAME-default}` (unset), defaults nested; an unset variable is empty. Filled-in values are not
    expanded again. Other `${...}` forms stay as written."""
    if "$(" in value or "`" in value:
        raise UserError(f"{where}: the value runs a command ({value!r}); write the value itself")
    out, i = [], 0
    while i < len(value):
        if value.startswith("${", i):
            depth, j = 1, i + 2
            while j < len(value) and depth:
                depth += {"{": 1, "}": -1}.get(value[j], 0)
                j += 1
            if depth:
                raise UserError(f"{where}: '${{' without its '}}' in {value!r}")
            braced = _BRACED.fullmatch(value[i + 2 : j - 1])
            if braced is None:
                out.append(value[i:j])
            else:
                name, operator, default = braced.groups()
                known = name in variables or name in os.environ
                current = variables.get(name, os.environ.get(name, ""))
                use_default = operator == ":-" and not current or operator == "-" and not known
                out.append(_expand(default, variables, where) if use_default else current)
            i = j
        elif value[i] == "$" and (name := _NAME.match(value, i + 1)):
            out.append(variables.get(name[0], os.environ.get(name[0], "")))
            i = name.end()
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def env_to_config(variables: dict[str, str]) -> tuple[dict, list[str]]:
    """(config keys, variable names we do not read) from config.env's variables, as SimpleTuner maps them: a
    "false" flag is left out, "true" sets it, TRAINER_EXTRA_ARGS holds `--key=value` / `--flag` words."""
    config, unknown = {}, []
    for name, value in variables.items():
        if name == "TRAINER_EXTRA_ARGS":
            config.update(_cli_words(value.split()))
        elif name == "USE_BITFIT":
            if value.lower() == "true":
                config["layer_freeze_strategy"] = "bitfit"
        elif name in ENV_KEYS:
            if value.lower() != "false":
                config[ENV_KEYS[name]] = True if value.lower() == "true" else value
        else:
            unknown.append(name)
    return config, unknown


def _cli_words(words: list[str]) -> dict:
    """`--key=value`, `--key value` and `--flag` words as config keys."""
    out: dict = {}
    i = 0
    while i < len(words):
        word = words[i].removeprefix("--")
        if "=" in word:
            key, value = word.split("=", 1)
            out[key] = value
        elif i + 1 < len(words) and not words[i + 1].startswith("--"):
            out[word] = words[i + 1]
            i += 1
        else:
            out[word] = True
        i += 1
    return out
