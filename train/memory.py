"""Fitting the step to the card: memory modes, the plan they resolve to, and the estimate behind `auto`.

A `MemoryPlan` says, per block, what the step does with memory: how many blocks are gradient-
checkpointed (the rest keep their activations), whether checkpointed blocks also keep their
attention outputs (`selective_checkpointing`: backward then recomputes everything but attention),
whether checkpointed blocks keep what they save in pinned host memory (`offload_activations`), how
many blocks keep their frozen weights in pinned host memory and are copied in as they run
(`blocks_to_swap`), and whether blocks are `torch.compile`d.

Modes are ladders of levers, from fastest to smallest, tried in the order below; within a mode,
the setting that fits the memory budget with the least recomputation, then the fewest swapped
blocks. Recomputing a block costs its forward; a selectively checkpointed block (attention outputs
kept, about 1/15 of a block's activations) skips attention, a share T / (T + 6 d) of the forward's
FLOPs at T tokens per sample and width d (a third at 1024² edit-v1). Within `low` and `minimal`,
swapping is counted as free: its copies overlap compute. Across modes the order decides: at 28 GiB
`fast` recomputes every block whole rather than `balanced` offloading inputs to recompute less
(offload's copies were measured slower than swapping; this trade is not measured).

| mode | weights | activations |
|---|---|---|
| `fast` | all on the GPU | checkpoint the fewest blocks that fit |
| `balanced` | all on the GPU | as fast, and checkpointed blocks' inputs in host memory |
| `low` | the fewest blocks swapped to host that fit (within half the host's memory) | every block checkpointed |
| `minimal` | the fewest blocks swapped that fit, up to all | every block checkpointed, inputs on the host |

Swapping a block frees ~6x what offloading one block's inputs does and costs less: its copies
overlap the other blocks' compute, while an offloaded input's round trip competes with the swap
copies and waits in backward. On one H200 (bench/train_step.py, edit-v1 at a 21.5 GiB budget):
every block checkpointed with 18 swapped ran 1.57 s/step, with 7 swapped and inputs offloaded 1.70.
So `low` swaps and keeps inputs on the GPU; `minimal`, the smallest step, does both.

`auto` takes the first mode that fits. Knobs the user sets in the config (`gradient_checkpointing`,
`gradient_checkpointing_interval`, `selective_checkpointing`, `blocks_to_swap`, `offload_activations`,
`compile_blocks`) win over the mode's choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shared.config_keys import MEMORY_MODES, TrainConfig
from shared.errors import UserError
from train.blocks import pinned_bytes

GIB = 2**30

# Bytes an un-checkpointed block keeps for backward, per token and per unit of model width (bf16
# autocast, int8 base, LoRA on attention; the largest part of a block's memory). Compiled: 28 measured
# with bench/train_step.py (edit-v1 1024², no block checkpointed: 0.77 GiB a block on H100 and H200),
# 30 used. Eager: 44 (1.2 GiB a block at 9592 tokens, issue 10's measurement of the eager stack).
ACTIVATION_BYTES = {True: 30.0, False: 44.0}
# What a checkpointed block keeps: its bf16 image and text hidden states; selective checkpointing
# adds attention's bf16 output and its float32 log-sum-exp per head (4 bytes x 24 heads / 3072 wide).
CHECKPOINT_BYTES = 2.0
SELECTIVE_BYTES = 2.0 + 4 / 128
# Bytes per frozen weight element, and per output row for the per-row scales (quanto keeps bf16 scales).
WEIGHT_BYTES = {
    "no_change": 2.0,
    "int8-quanto": 1.0,
    "fp8-quanto": 1.0,
    "fp8uz-quanto": 1.0,
    "int4-quanto": 0.5,
    "int2-quanto": 0.25,
    "nf4-bnb": 0.5,
}
# quanto int4/int2: scale + shift per group of 128. bitsandbytes NF4 with double quantisation: an 8-bit scale per
# 64 weights, and an fp32 scale per 256 of those.
GROUP_SCALE_BYTES = {"int4-quanto": 4 / 128, "int2-quanto": 4 / 128, "nf4-bnb": 1 / 64 + 4 / (64 * 256)}
# Beyond the estimate: allocator slack, the loss tail, cuBLAS workspaces, and what compiling the first
# step reserves on top. bench/product.py (one H200, edit-v1 at 1024², low) measured peak reserved memory
# up to 0.56 GiB above the estimate with 1.0 GiB here.
FIXED_MARGIN = 1.75 * GIB
RELATIVE_MARGIN = 0.05


@dataclass(frozen=True)
class MemoryPlan:
    """What the step does with memory; `checkpointed` and `swapped` are block indices."""

    mode: str
    n_blocks: int
    checkpointed: frozenset[int]
    swapped: tuple[int, ...]
    offload_activations: bool
    compile_blocks: bool
    selective: bool = False  # checkpointed blocks keep their attention outputs
    estimate_bytes: float = 0.0
    budget_bytes: float = 0.0
    host_bytes: float = 0.0  # pinned host memory the swapped blocks' weights take

    def describe(self) -> str:
        budget = f"{self.budget_bytes / GIB:.1f} GiB budget" if self.budget_bytes else "no budget (CPU)"
        lines = [
            f"memory_mode {self.mode}: {len(self.checkpointed)}/{self.n_blocks} blocks checkpointed"
            f"{' selectively (attention kept)' if self.selective and self.checkpointed else ''}"
            f"{' (inputs offloaded to host)' if self.offload_activations and self.checkpointed else ''}, "
            f"{len(self.swapped)} swapped to host ({self.host_bytes / GIB:.1f} GiB pinned), "
            f"compile {'on' if self.compile_blocks else 'off'}; estimated peak {self.estimate_bytes / GIB:.1f} GiB "
            f"of {budget}"
        ]
        if self.budget_bytes and self.estimate_bytes > self.budget_bytes:
            lines.append(
                f"  warning: memory_mode {self.mode} is estimated to need more than the budget and may run out of "
                "memory; memory_mode auto picks a mode that fits"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class StepCosts:
    """Memory of one training step's parts, in bytes (see `step_costs`)."""

    n_blocks: int
    block_weights: float  # one block's frozen weights at the base precision
    block_pinned: float  # the pinned host memory they take when swapped (see `train.blocks.pinned_bytes`)
    other_weights: float  # everything outside the blocks (bf16)
    trainable: float  # LoRA parameters, their gradients, AdamW's moments (and an EMA on the GPU)
    token_width: float  # tokens of the largest batch x model width: activations scale with it
    attention_share: float = 0.0  # attention's share of a block's forward FLOPs at those tokens

    def recomputation(self, checkpointed: int, selective: bool) -> float:
        """What backward recomputes, in blocks' forwards (selective blocks skip attention)."""
        return checkpointed * (1.0 - self.attention_share if selective else 1.0)

    def estimate(self, checkpointed: int, swapped: int, offload: bool, compiled: bool, selective: bool) -> float:
        """Peak bytes of a step with this many checkpointed and swapped blocks."""
        resident_blocks = self.n_blocks - swapped + min(swapped, 2)  # swapped blocks share two GPU slots
        block_activations = ACTIVATION_BYTES[compiled] * self.token_width
        kept = (self.n_blocks - checkpointed) * block_activations
        per_checkpoint = CHECKPOINT_BYTES + (SELECTIVE_BYTES if selective else 0.0)
        kept += checkpointed * (0.0 if offload else per_checkpoint * self.token_width)
        # A block recomputed in backward holds its activations and their gradients' working set:
        # about 1.3x its activations (bench/train_step.py at 9.6k and 17.8k tokens); 1.5x used.
        working = 1.5 * block_activations if checkpointed else 0.0
        total = self.other_weights + resident_blocks * self.block_weights + self.trainable + kept + working
        return total * (1 + RELATIVE_MARGIN) + FIXED_MARGIN


def step_costs(transformer: torch.nn.Module, config: TrainConfig, tokens: int) -> StepCosts:
    """Estimate the step's memory for `transformer` (bf16, not yet quantised) at `tokens` per batch.

    `tokens` counts image tokens (target and references) and text tokens of the largest batch.
    """
    blocks = transformer.transformer_blocks
    precision = config.base_model_precision
    per_weight = WEIGHT_BYTES[precision] + GROUP_SCALE_BYTES.get(precision, 0.0)
    tensors: list[float] = []  # bytes of each of a block's tensors (weight data, scales, biases, norms)
    for name, module in blocks[0].named_modules():
        if isinstance(module, torch.nn.Linear):
            quantised = precision != "no_change" and "norm" not in name
            tensors.append(module.weight.numel() * (per_weight if quantised else 2.0))
            tensors.append(module.out_features * 2.0 * quantised)  # per-row scales
            tensors.append(2.0 * (module.bias.numel() if module.bias is not None else 0))
        elif not list(module.children()):  # norms
            tensors += [2.0 * p.numel() for p in module.parameters(recurse=False)]
    total = sum(p.numel() for p in transformer.parameters())
    per_block_params = sum(p.numel() for p in blocks[0].parameters())
    other = 2.0 * (total - len(blocks) * per_block_params)
    lora = _lora_parameters(transformer, config)
    trainable = lora * (4 + 4 + 8 + (4 if config.use_ema and config.ema_device == "accelerator" else 0))
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    sample_tokens = tokens / max(config.train_batch_size, 1)
    return StepCosts(
        n_blocks=len(blocks),
        block_weights=sum(tensors),
        block_pinned=sum(pinned_bytes(t) for t in tensors),
        other_weights=other,
        trainable=trainable,
        token_width=float(tokens * width),
        # per sample of T tokens: attention 4 T² d FLOPs; linear layers 2 T x 12 d² (q, k, v, out: 4 d²; MLP: 8 d²)
        attention_share=sample_tokens / (sample_tokens + 6 * width),
    )


def _lora_parameters(transformer: torch.nn.Module, config: TrainConfig) -> int:
    targets = config.lora_modules
    count = 0
    for name, module in transformer.transformer_blocks.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            count += config.lora_rank * (module.in_features + module.out_features)
    return count


def spread(count: int, n_blocks: int) -> list[int]:
    """`count` block indices spread evenly over `n_blocks` (so swapped or kept blocks alternate)."""
    if count <= 0:
        return []
    return sorted({round(i * n_blocks / count + (n_blocks / count - 1) / 2) for i in range(count)})


# Base precisions whose frozen weights torch.compile cannot run, and why. int4-quanto: on a bf16 model
# whose layers are multiples of 128 wide (every real one), optimum-quanto keeps the weights in tinygemm's
# packed layout, and a compiled block fails ('TinyGemmWeightQBitsTensor' object has no attribute '_scale', from
# quanto's own error message, on the H200 and on the CPU; a no-grad call on the CPU fails in inductor's int4
# matmul instead); measured with optimum-quanto 0.2.7, torch 2.11 (H200) and 2.14 (CPU). Those blocks run
# eagerly, on quanto's own 4-bit kernels. fp8uz-quanto: float8_e4m3fnuz (AMD's fp8) has no conversion Triton
# can compile on an NVIDIA GPU ("Triton compilation failed" at the first step on the H200); eager, torch
# converts it.
EAGER_ONLY = {
    "int4-quanto": "optimum-quanto's 4-bit layout (tinygemm) cannot be compiled by torch.compile",
    "fp8uz-quanto": "Triton cannot compile float8_e4m3fnuz (AMD's fp8) conversions on an NVIDIA GPU",
}


def compile_blocks(config: TrainConfig, explicit: set[str], gpu: bool) -> bool:
    """Whether blocks are `torch.compile`d: as `compile_blocks` says when the user set it, else on a GPU, except
    for a base precision in `EAGER_ONLY` (which refuses an explicit `compile_blocks: true`)."""
    why = EAGER_ONLY.get(config.base_model_precision)
    if "compile_blocks" in explicit:
        if config.compile_blocks and why:
            raise UserError(
                f"compile_blocks: true cannot be used with base_model_precision {config.base_model_precision}: "
                f"{why}. Remove compile_blocks (blocks then run without compiling)"
            )
        return config.compile_blocks
    return gpu and not why


def choose_plan(
    config: TrainConfig, costs: StepCosts, budget: float, explicit: set[str], host_budget: float = float("inf")
) -> MemoryPlan:
    """The plan for `config.memory_mode` within `budget` bytes of GPU memory (0: no limit), the user's
    knobs applied. `low` swaps at most `host_budget` bytes of weights to pinned host memory (`minimal`
    as many as it needs).

    `explicit` holds the config keys the user set; those win over what the mode would pick.
    """
    compiled = compile_blocks(config, explicit, torch.cuda.is_available())
    named = _simpletuner_blocks(costs.n_blocks, config, explicit)
    modes = MEMORY_MODES if config.memory_mode == "auto" else (config.memory_mode,)
    max_swapped = costs.n_blocks
    if math.isfinite(host_budget) and costs.block_pinned > 0:
        max_swapped = min(costs.n_blocks, int(host_budget // costs.block_pinned))
    for mode in modes:
        for candidate in _candidates(mode, costs, config, explicit, named, max_swapped):
            plan = _plan(mode, costs, *candidate, compiled, budget, named)
            if not budget or plan.estimate_bytes <= budget:
                return plan
    last = _candidates(modes[-1], costs, config, explicit, named, max_swapped)[-1]
    smallest = _plan(modes[-1], costs, *last, compiled, budget, named)
    if config.memory_mode != "auto":  # the user asked for this mode: run its smallest setting, and say so
        return smallest
    estimate = smallest.estimate_bytes
    raise UserError(
        f"the smallest memory mode needs about {estimate / GIB:.1f} GiB, but the budget is "
        f"{budget / GIB:.1f} GiB (free GPU memory, or memory_budget_gib). Lower the dataset's resolution, "
        "train_batch_size or number of references, or use base_model_precision int4-quanto."
    )


def _candidates(
    mode: str, costs: StepCosts, config: TrainConfig, explicit: set[str], named: frozenset[int] | None, max_swapped: int
) -> list[tuple[int, int, bool, bool]]:
    """(checkpointed blocks, swapped blocks, offload, selective) settings of `mode`, fastest first: the
    least recomputation, then the fewest swapped blocks. The last one needs the least memory."""
    n = costs.n_blocks
    offload = config.offload_activations if "offload_activations" in explicit else mode in ("balanced", "minimal")
    if mode in ("fast", "balanced"):
        sizes = [(c, 0) for c in range(n + 1)]  # checkpoint as few blocks as fit
    else:  # swap as few as fit
        sizes = [(n, s) for s in range(max_swapped + 1 if mode == "low" else n + 1)]
    if config.base_model_precision == "nf4-bnb":  # bitsandbytes' 4-bit blocks cannot be swapped (train/model.py)
        sizes = [(c, 0) for c, _ in sizes]
    if "blocks_to_swap" in explicit:
        swap = min(max(config.blocks_to_swap, 0), n)
        sizes = [(c, swap) for c, _ in sizes]
    if named is not None:  # the user named the checkpointed blocks
        sizes = [(len(named), s) for _, s in sizes]
    selective = [config.selective_checkpointing] if "selective_checkpointing" in explicit else [True, False]
    candidates = {(c, s, offload, keep and c > 0) for c, s in sizes for keep in selective}
    return sorted(candidates, key=lambda c: (costs.recomputation(c[0], c[3]), c[1], -c[3]))


def _simpletuner_blocks(n: int, config: TrainConfig, explicit: set[str]) -> frozenset[int] | None:
    """The blocks SimpleTuner's keys checkpoint when the user set them (every
    `gradient_checkpointing_interval`-th from block 0, or none); None when the mode decides."""
    if not {"gradient_checkpointing", "gradient_checkpointing_interval"} & explicit:
        return None
    on = config.gradient_checkpointing or "gradient_checkpointing" not in explicit
    return frozenset(range(0, n, config.gradient_checkpointing_interval)) if on else frozenset()


# The config keys that shape the memory plan (beside memory_mode itself).
MEMORY_KEYS = (
    "gradient_checkpointing",
    "gradient_checkpointing_interval",
    "selective_checkpointing",
    "blocks_to_swap",
    "offload_activations",
    "compile_blocks",
    "memory_budget_gib",
)


def _plan(
    mode: str,
    costs: StepCosts,
    checkpointed: int,
    swapped: int,
    offload: bool,
    selective: bool,
    compiled: bool,
    budget: float,
    named: frozenset[int] | None = None,
) -> MemoryPlan:
    """Which blocks: swapped ones spread evenly (so copies overlap the resident blocks' compute); the
    blocks the user `named` checkpointed, or else the swapped blocks first (those hold the least on
    the GPU while their weights travel), then others, each group spread evenly."""
    n = costs.n_blocks
    swapped_blocks = spread(swapped, n)
    if named is not None:
        chosen = frozenset(named)
    elif checkpointed <= len(swapped_blocks):
        chosen = frozenset(swapped_blocks[i] for i in spread(checkpointed, len(swapped_blocks)))
    else:
        others = [i for i in range(n) if i not in swapped_blocks]
        chosen = frozenset(swapped_blocks) | {
            others[i] for i in spread(checkpointed - len(swapped_blocks), len(others))
        }
    estimate = costs.estimate(len(chosen), swapped, offload, compiled, selective)
    host = swapped * costs.block_pinned
    return MemoryPlan(mode, n, chosen, tuple(swapped_blocks), offload, compiled, selective, estimate, budget, host)


def host_swap_budget() -> float:
    """Bytes of pinned host memory `low` may give swapped weights: half the host's memory, or of the
    smallest memory limit of this process's cgroups (v1 or v2, each level up to the root), if lower.
    Pinned pages cannot be paged out."""
    import os

    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for path in _cgroup_limit_files():
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # v2 writes "max" when there is no limit
            limits.append(int(text))
    return min(limits) / 2


def _cgroup_limit_files() -> list:
    """The memory-limit files of this process's cgroup and of each cgroup above it."""
    from pathlib import Path

    files = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return files
    for line in lines:  # "hierarchy-id:controllers:path"
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            root, name = Path("/sys/fs/cgroup"), "memory.max"
        elif "memory" in controllers.split(","):  # cgroup v1
            root, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        else:
            continue
        folder = root / path.lstrip("/")
        files += [directory / name for directory in (folder, *folder.parents) if directory.is_relative_to(root)]
    return files


def free_memory(device: torch.device, config: TrainConfig) -> float:
    """The budget in bytes: `memory_budget_gib` if set, else the GPU's free memory now (0 on CPU: no limit)."""
    if config.memory_budget_gib > 0:
        return config.memory_budget_gib * GIB
    if device.type != "cuda":
        return 0.0
    free, _ = torch.cuda.mem_get_info(device)
    return float(free)
