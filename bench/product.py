"""The product bench: `prep build-cache` and `train run` through their own command lines, at real size.

    python bench/product.py                                   # edit-v1: whole card, 24 GB, 16 GB; edit-v2: 24 GB
    python bench/product.py --cases edit-v1:24gb --steps 12   # one case
    python bench/product.py --size tiny --cases edit-v1:cpu   # the same path on a CPU, with the tiny model
    python bench/product.py --cases edit-v1:card --set scheduled_sampling_max_step_offset=3 \
        --set scheduled_sampling_probability=0.5                # any config key on top of every case

Once per work folder it writes a random Qwen-Image-Edit checkpoint in the diffusers folder layout
(`--size real`: the real transformer, 60 blocks 3072 wide, 20B parameters, and the real VAE; a
Qwen2.5-VL text encoder of real widths but two layers, with the tiny tokenizer and the real
processor's pixel limits, so prompts hold as many image tokens as with the real one) and a dataset
of edit pairs of ~1 MP in three aspect buckets, captions of varied length, 1 reference (edit-v1) or
3 of different sizes (edit-v2). Then, per case, as a user would: `prep build-cache`, then `train run`
with eval samples held out (held-out loss and previews at step 0 and at the end), a checkpoint half
way, and `train export` of the last checkpoint; one case (`--resume-case`) is killed (-9) after its
checkpoint and run again, which resumes; one (`--rerun-case`) is run a second time from scratch into a
new output folder, as a user's second run of a config, and stopped after its checkpoint.

Smaller cards are emulated: the case sets `memory_budget_gib` (what `auto` plans for) and the
allocator refuses more than the card (`torch.cuda.set_per_process_memory_fraction`, set before
`train run` starts); the offloading modes `balanced` and `minimal`, which `auto` picks only where
they are the first mode that fits, are asked for by name. Every number comes from the run's own
`run_stats.json` (train/timing.py): time from the command to its first finished step, steady s/step,
peak GPU memory reserved per phase, host peak RSS. Each case compiles into its own empty compile
caches (inductor's and Triton's); the resumed run and the second run reuse them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (train settings, allocator cap in GiB or 0)
CARDS = {
    "card": ({}, 0.0),
    "24gb": ({"memory_budget_gib": 21.5}, 23.5),
    "16gb": ({"memory_budget_gib": 15.0}, 15.5),
    # the two offloading modes, asked for by name (auto picks them only where they are the first that fits)
    "balanced": ({"memory_mode": "balanced", "memory_budget_gib": 40.0}, 42.0),
    "minimal": ({"memory_mode": "minimal", "memory_budget_gib": 15.0}, 15.5),
    "cpu": ({}, 0.0),
}
DEFAULT_CASES = ["edit-v1:card", "edit-v1:24gb", "edit-v1:16gb", "edit-v2:24gb"]
WORDS = "make the jacket red and keep the face hair and background exactly as they are in the photo".split()


def write_model(path: Path, size: str) -> Path:
    """A random Qwen-Image-Edit at `size` in the diffusers layout (one folder serves edit-v1 and edit-v2:
    the product reads the components, not model_index.json's pipeline class)."""
    from diffusers import QwenImageEditPipeline

    from demo.tiny_model import build_components

    if (path / "model_index.json").is_file():
        return path
    components = build_components()
    if size == "real":
        components.update(real_components(components["tokenizer"]))
    QwenImageEditPipeline(**components).save_pretrained(path, max_shard_size="10GB")
    return path


def real_components(tokenizer) -> dict:
    """The real transformer and VAE (random weights, std 0.02, drawn on the GPU when there is one), and a
    two-layer text encoder of the real widths."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with init_empty_weights():  # parameters on the meta device; buffers (RoPE tables) real
        transformer = QwenImageTransformer2DModel()  # diffusers' defaults are Qwen-Image's shapes
    generator = torch.Generator(device).manual_seed(0)
    for module in transformer.modules():
        for name, param in module._parameters.items():
            if param is not None:
                value = torch.randn(param.shape, generator=generator, device=device, dtype=torch.bfloat16) * 0.02
                module._parameters[name] = torch.nn.Parameter(value.cpu(), requires_grad=False)
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 2,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": len(tokenizer),
            "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 2, "hidden_size": 1280, "out_hidden_size": 3584, "fullatt_block_indexes": [1]},
        vocab_size=len(tokenizer),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    return {"transformer": transformer, "vae": AutoencoderKLQwenImage(), "text_encoder": text_encoder}


def write_dataset(root: Path, n: int, n_refs: int, side: int, seed: int = 0, buckets: int = 3) -> Path:
    """`n` edit pairs of about `side`² pixels in `buckets` (up to three) aspect buckets, captions of 4 to 30
    words, `n_refs` references each (references after the first at other sizes, when there are several)."""
    from PIL import Image

    if (root / "images").is_dir():
        return root
    rng = np.random.default_rng(seed)
    shapes = [(side, side), (side * 7 // 8, side * 9 // 8), (side * 9 // 8, side * 7 // 8)][:buckets]

    def picture(width: int, height: int) -> Image.Image:  # smooth random colours: compresses, looks like a photo
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        return Image.fromarray(small).resize((width, height), Image.BILINEAR)

    folders = ["reference"] + [f"reference{i + 1}" for i in range(1, n_refs)]
    for folder in ["images", *folders]:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"pair_{i:04d}"
        width, height = shapes[i % len(shapes)]
        picture(width, height).save(root / "images" / f"{name}.png")
        for k, folder in enumerate(folders):
            w, h = (width, height) if k == 0 else shapes[(i + k) % len(shapes)]
            picture(w, h).save(root / folder / f"{name}.png")
        words = rng.choice(WORDS, size=int(rng.integers(4, 31)))
        (root / "images" / f"{name}.txt").write_text(" ".join(words) + "\n")
    return root


def write_config(work: Path, case: str, model: Path, data: Path, n_refs: int, args) -> Path:
    """config.json + multidatabackend.json of `case` ("flavour:card"), SimpleTuner's keys as its Qwen edit
    quickstart sets them (int8-quanto, rank 16, shift 1.73), one cache per flavour."""
    flavour, card = case.split(":")
    folder = work / case.replace(":", "-")
    shutil.rmtree(folder, ignore_errors=True)  # a case starts a new run each time (the model and caches stay)
    folder.mkdir(parents=True)
    refs = ["reference"] + [f"reference{i + 1}" for i in range(1, n_refs)]
    backend = [
        {
            "id": "edits",
            "type": "local",
            "instance_data_dir": str(data / "images"),
            "caption_strategy": "textfile",
            "resolution": args.resolution,
            "conditioning_data": [f"ref{i}" for i in range(n_refs)],
            "cache_dir_vae": str(work / f"cache-{flavour}"),
        }
    ] + [
        {
            "id": f"ref{i}",
            "type": "local",
            "dataset_type": "conditioning",
            "instance_data_dir": str(data / folder_name),
            "conditioning_type": "reference_strict" if n_refs == 1 else "reference_loose",
            "resolution": args.resolution,
        }
        for i, folder_name in enumerate(refs)
    ]
    config = {
        "model_type": "lora",
        "model_family": "qwen_image",
        "model_flavour": flavour,
        "pretrained_model_name_or_path": str(model),
        "data_backend_config": str(folder / "multidatabackend.json"),
        "output_dir": str(folder / "output"),
        "train_batch_size": 1,
        "learning_rate": 1e-4,
        "lora_rank": 16,
        "lora_alpha": 16,
        "lora_target": "attention",  # both streams, as every number in bench/RESULTS.md was measured
        "base_model_precision": "int8-quanto",
        "quantize_via": "accelerator",
        "flow_schedule_shift": 1.73,
        "max_train_steps": args.steps,
        "checkpointing_steps": args.steps // 2,
        "eval_holdout": 2,
        "validation_step_interval": args.steps,
        "validation_num_inference_steps": args.preview_steps,
        "validation_guidance": 4.0,
        "seed": 1,
        **CARDS[card][0],
        **dict(args.set),
    }
    (folder / "multidatabackend.json").write_text(json.dumps(backend, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder / "config.json"


def command(app: str, *args: str, cap_gib: float = 0.0) -> list[str]:
    """`prep ...` / `train ...` as the installed scripts run them; with `cap_gib`, on a card of that size."""
    cap = ""
    if cap_gib:  # the cap starts CUDA, so first the allocator setting `train run` makes before CUDA starts
        cap = (
            "from train.cli import use_expandable_segments; use_expandable_segments(); "
            "import torch; torch.cuda.set_per_process_memory_fraction("
            f"{cap_gib * 2**30} / torch.cuda.get_device_properties(0).total_memory); "
        )
    return [sys.executable, "-c", f"{cap}import sys; from {app}.cli import app; sys.argv[0] = '{app}'; app()", *args]


def run(cmd: list[str], log: Path, env: dict, kill_when: Path | None = None) -> tuple[int, float]:
    """Run `cmd` with its output in `log`; with `kill_when`, kill -9 it as soon as that path exists."""
    start = time.perf_counter()
    with log.open("a") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while process.poll() is None:
            if kill_when is not None and kill_when.exists():
                process.send_signal(signal.SIGKILL)
            time.sleep(0.5)
    return process.returncode, time.perf_counter() - start


def train_case(case: str, config: Path, args) -> dict:
    """`train run` to the end, then `train export`; for `--resume-case`, killed (-9) after the checkpoint half way
    and run again (it resumes, with the compile cache the first run filled). The runs' own stats."""
    flavour, card = case.split(":")
    folder, cap = config.parent, CARDS[card][1]
    cold = {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor-cache"), "TRITON_CACHE_DIR": str(folder / "triton-cache")}
    env = dict(os.environ, **cold)  # empty for this case's first run
    log = folder / "train.log"
    halfway = folder / "output" / "checkpoints" / f"checkpoint-{args.steps // 2:06d}"
    kill = halfway if case == args.resume_case else None
    row: dict = {"case": case}
    rc, seconds = run(command("train", "run", "--config", str(config), cap_gib=cap), log, env, kill_when=kill)
    row.update(rc=rc, wall_s=round(seconds, 1))
    row.update(read_stats(folder / "output") or {})  # a killed run's stats go up to its last checkpoint
    if kill is not None and halfway.exists():
        resume = command("train", "run", "--config", str(config), "--resume-from-checkpoint", "latest", cap_gib=cap)
        rc, seconds = run(resume, log, env)
        row.update({"resumed rc": rc, "resumed wall_s": round(seconds, 1)})
        row.update({f"resumed {k}": v for k, v in (read_stats(folder / "output") or {}).items()})
    if rc != 0:
        row["error"] = tail(log)
        return row
    if case == args.rerun_case:
        row.update(second_run(config, cap, env, args))
    last = folder / "output" / "checkpoints" / f"checkpoint-{args.steps:06d}"
    row["export rc"], _ = run(command("train", "export", str(last), "--format", "comfyui"), log, env)
    return row


def second_run(config: Path, cap: float, env: dict, args) -> dict:
    """The same config again into a new output folder, compile caches as the first run left them: a user's
    second run. Stopped (-9) after its checkpoint half way; its stats go up to there."""
    settings = json.loads(config.read_text())
    settings["output_dir"] = str(config.parent / "output-second")
    second = config.with_name("config-second.json")
    second.write_text(json.dumps(settings, indent=1))
    halfway = config.parent / "output-second" / "checkpoints" / f"checkpoint-{args.steps // 2:06d}"
    log = config.parent / "train-second.log"
    rc, seconds = run(command("train", "run", "--config", str(second), cap_gib=cap), log, env, kill_when=halfway)
    stats = read_stats(config.parent / "output-second") or {}
    return {"second rc": rc, **{f"second {k}": v for k, v in stats.items()}}


def read_stats(output_dir: Path) -> dict | None:
    path = output_dir / "run_stats.json"
    if not path.is_file():
        return None
    stats = json.loads(path.read_text())
    path.unlink()  # the rerun writes its own
    flat = {
        "first step after s": stats["first_step_since_start_s"],
        "steady s/step": stats["steady_s_per_step"],
        "host RSS GiB": stats["host_peak_rss_gib"],
    }
    flat.update({f"{phase} s": s for phase, s in stats["phase_s"].items()})
    flat.update({f"{phase} GiB": gib for phase, gib in stats["peak_reserved_gib"].items()})
    return flat


def tail(log: Path, lines: int = 12) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])[-2000:]


def setting(text: str) -> tuple[str, object]:
    """KEY=VALUE, VALUE read as JSON where it is JSON (3, 0.5, true), else as a string."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="flavour:card, card in " + ", ".join(CARDS))
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "product")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=1024, help="pixel_area resolution of the dataset")
    parser.add_argument("--steps", type=int, default=16, help="max_train_steps (a checkpoint and a kill half way)")
    parser.add_argument("--preview-steps", type=int, default=8, help="validation_num_inference_steps")
    parser.add_argument("--resume-case", default="edit-v1:24gb", help="the case killed half way and resumed")
    parser.add_argument("--rerun-case", default="none", help="the case run a second time from scratch (warm caches)")
    parser.add_argument("--json", type=Path, help="append every row to this JSON-lines file")
    parser.add_argument(
        "--set",
        type=setting,
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="one more config.json key for every case, e.g. scheduled_sampling_max_step_offset=3 (repeatable)",
    )
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = write_model(work / f"model-{args.size}", args.size)
    print(f"model ready in {time.perf_counter() - start:.0f} s: {model}", flush=True)
    side = args.resolution
    built = set()
    for case in args.cases:
        flavour = case.split(":")[0]
        n_refs = 1 if flavour == "edit-v1" else 3
        data = write_dataset(work / f"data-{n_refs}ref-{side}", args.pairs, n_refs, side)
        config = write_config(work, case, model, data, n_refs, args)
        if flavour not in built:  # one cache per flavour, built by the product's own command
            prep = command("prep", "build-cache", "--config", str(config))
            rc, seconds = run(prep, work / f"prep-{flavour}.log", dict(os.environ))
            print(f"prep build-cache {flavour}: rc {rc}, {seconds:.0f} s", flush=True)
            built.add(flavour)
        row = train_case(case, config, args)
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
