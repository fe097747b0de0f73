"""Memory modes: every lever leaves the loss and LoRA gradients as the plain path; `auto` fits the card."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import QwenImageTransformer2DModel

from shared.config import TrainConfig
from shared.errors import UserError
from train.batch import Batch
from train.blocks import BlockForward, plain_tensors
from train.memory import GIB, MemoryPlan, choose_plan, compile_blocks, spread, step_costs
from train.model import prepare_for_lora
from train.objective import SigmaSchedule, flow_matching_loss

TINY = dict(
    num_layers=4, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)
)
REAL = dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584)


def tiny_lora_transformer(plan: MemoryPlan) -> torch.nn.Module:
    """A 4-block int8 transformer with LoRA (lora_B non-zero, so every adapter has a gradient), placed per `plan`."""
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, **TINY).bfloat16()
    config = TrainConfig(base_model_precision="int8-quanto", lora_rank=4, lora_alpha=4)
    transformer = prepare_for_lora(transformer, config, torch.device("cpu"), plan)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return transformer


def loss_and_gradients(transformer: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    batch = Batch(
        target=torch.randn(1, 16, 8, 12, generator=g).bfloat16(),
        references=[torch.randn(1, 16, 8, 8, generator=g).bfloat16()],
        prompt=torch.randn(1, 9, 32, generator=g).bfloat16(),
        prompt_mask=None,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = flow_matching_loss(transformer, batch, SigmaSchedule(shift=1.73), torch.Generator().manual_seed(0))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}


def plan(checkpointed=(), swapped=(), offload=False, compiled=False, selective=False) -> MemoryPlan:
    return MemoryPlan("test", 4, frozenset(checkpointed), tuple(swapped), offload, compiled, selective)


@pytest.fixture(scope="module")
def plain():
    """The plain path: diffusers' own block forward, nothing checkpointed, swapped or compiled."""
    transformer = tiny_lora_transformer(plan())
    for block in transformer.transformer_blocks:
        assert isinstance(block.forward, BlockForward)
        del block.forward  # back to the class's forward
    return loss_and_gradients(transformer)


@pytest.mark.parametrize(
    "lever",
    [
        plan(checkpointed={1, 3}),
        plan(checkpointed={0, 1, 2, 3}, selective=True),
        plan(checkpointed={0, 1, 2, 3}, offload=True),
        plan(swapped=(0, 1, 3)),
        plan(checkpointed={1, 2}, swapped=(0, 1, 3), offload=True, selective=True),
    ],
    ids=["checkpoint-some", "checkpoint-all-selective", "checkpoint-all-offload", "swap-3-of-4", "swap-mixed"],
)
def test_eager_levers_compute_exactly_the_plain_step(plain, lever):
    transformer = tiny_lora_transformer(lever)
    loss, grads = loss_and_gradients(transformer)
    want_loss, want = plain
    assert grads.keys() == want.keys()
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=0, atol=0, msg=name)


def test_swapped_blocks_share_two_gpu_slots_and_are_copied_in_as_they_run():
    transformer = tiny_lora_transformer(plan(swapped=(0, 1, 2, 3)))
    blocks = transformer.transformer_blocks
    swap = blocks[0].forward.swap
    data = [b.attn.to_q.base_layer.weight._data.data_ptr() for b in blocks]
    # swapped block k runs from slot k % 2: blocks 0 and 2 share one set of parameters, 1 and 3 the other
    assert data[0] == data[2] and data[1] == data[3] and data[0] != data[1]
    first = [t.clone() for t in plain_tensors(blocks[0].attn.to_q.base_layer.weight)]
    # each block's own bytes are kept on the host, and differ between blocks
    assert len(swap.host) == 4 and not torch.equal(swap.host[0][0], swap.host[2][0])
    loss_and_gradients(transformer)
    # forward: 0, 1 resident, then 2 and 3 copied in; backward: 3, 2 resident, then 1 and 0 copied in
    assert swap.copies == 4
    assert swap.resident == [0, 1]
    now = plain_tensors(blocks[0].attn.to_q.base_layer.weight)
    assert all(torch.equal(a, b) for a, b in zip(first, now, strict=True))  # block 0 is back in slot 0


class Step(NamedTuple):
    """One step of a freshly built transformer: its loss and gradients, what the offload hook packed, the hook."""

    result: tuple[torch.Tensor, dict[str, torch.Tensor]]
    packed: list
    offload: Any


@functools.cache
def one_step(lever: MemoryPlan) -> Step:
    """One step through blocks placed per `lever`, from a fresh Dynamo (the same for the same plan), recording
    what the activation offload packs (when the plan offloads; recording changes nothing it computes). Taken
    once per plan and process: the offloaded, selective, compiled plan is both a bf16-rounding case and the
    offload test's compiled case, and compiling it (Dynamo and AOT tracing) is most of either test's time."""
    torch._dynamo.reset()
    transformer = tiny_lora_transformer(lever)
    offload = transformer.transformer_blocks[0].forward.offload
    packed = []
    if offload is not None:
        pack = offload.pack
        offload.pack = lambda tensor: packed.append(result := pack(tensor)) or result
    return Step(loss_and_gradients(transformer), packed, offload)


SELECTIVE_OFFLOADED = plan(checkpointed={0, 1, 2, 3}, offload=True, compiled=True, selective=True)


# Selective blocks with their offloaded inputs (the offload test's step). Compiled plain blocks beside wholly
# checkpointed ones (not selective), offloaded and swapped, are tests/train/test_compiled_run.py's run, whose step
# is compared with the eager one the same way (each plan compiled from cold is most of a minute of the suite on
# two cores).
@pytest.mark.parametrize("lever", [SELECTIVE_OFFLOADED], ids=["selective-offloaded"])
def test_compiled_blocks_keep_loss_and_gradients_within_bf16_rounding(plain, lever):
    loss, grads = one_step(lever).result
    want_loss, want = plain
    torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=0)
    errors = sorted(((grads[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12)).item() for n in want)
    # inductor rounds bf16 intermediates differently; a wrong computation would be off by ~100%
    assert errors[len(errors) // 2] < 0.02 and errors[-1] < 0.1, errors


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_offload_moves_what_selective_checkpointing_keeps_and_never_the_weights(compiled):
    """Offloaded: a checkpointed block's inputs and kept attention outputs (their strides as they were,
    which compiled backward code checks), not the weights the block saves for backward."""
    # compiled: the same plan (and step) as the bf16 test's selective-offloaded case, taken once
    step = one_step(plan(checkpointed={0, 1, 2, 3}, offload=True, compiled=compiled, selective=True))
    offload, packed = step.offload, step.packed
    moved = [p[1] for p in packed if isinstance(p, tuple)]
    kept = [p for p in packed if isinstance(p, torch.Tensor)]
    heads, head_dim = TINY["num_attention_heads"], TINY["attention_head_dim"]
    attention = [t for t in moved if t.dim() == 4 and t.shape[-1] == head_dim and heads in t.shape[1:3]]
    assert len(attention) >= 4, [tuple(t.shape) for t in moved]  # one attention output per block at least
    if compiled:  # inductor saves it as [B, T, heads, d] strides over [B, heads, T, d] and checks them in backward
        assert any(not t.is_contiguous() for t in attention)
    assert all(t.untyped_storage().data_ptr() in offload.weights for t in kept)


def real_size_costs(config: TrainConfig, tokens: int):
    with init_empty_weights():  # parameters on the meta device: counted, never allocated
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, **REAL)
    return step_costs(transformer, config, tokens)


EDIT_V1_TOKENS = 4096 + 4096 + 1400  # 1024² target and reference, a 1400-token instruction


def test_auto_picks_smaller_modes_as_the_card_gets_smaller():
    config = TrainConfig(base_model_precision="int8-quanto", lora_target="attention")  # both streams, as benched
    costs = real_size_costs(config, EDIT_V1_TOKENS)
    assert 0.3 * GIB < costs.block_weights < 0.35 * GIB  # a block of the 20B model in int8
    assert 0.5 * GIB <= costs.block_pinned < 0.51 * GIB  # pinned, each tensor rounded up to a power of two
    host = 32 * GIB  # a 64 GiB host: low pins at most 32 GiB of swapped weights
    plans = {gib: choose_plan(config, costs, gib * GIB, set(), host) for gib in (78, 28, 26, 21.5, 15, 8)}
    assert [plans[g].mode for g in plans] == ["fast", "fast", "balanced", "low", "low", "minimal"]
    assert plans[78].swapped == () and len(plans[78].checkpointed) < len(plans[28].checkpointed)
    assert plans[26].offload_activations and not plans[28].offload_activations
    # low swaps rather than offloads (cheaper per byte freed), within the host's share; minimal does both
    assert not plans[21.5].offload_activations and not plans[15].offload_activations
    assert 0 < len(plans[21.5].swapped) < len(plans[15].swapped) <= host / costs.block_pinned
    assert plans[15].host_bytes <= host and plans[8].offload_activations and plans[8].swapped
    for gib, chosen in plans.items():
        assert chosen.estimate_bytes <= gib * GIB
    # Checkpointed blocks keep their attention outputs (less recomputation) where that fits, at the price
    # of more blocks swapped; at 28 GiB fast fits only by recomputing attention too.
    assert all(plans[g].selective for g in (78, 26, 21.5, 15)) and not plans[28].selective
    config.selective_checkpointing = False
    recompute_attention = choose_plan(config, costs, 21.5 * GIB, {"selective_checkpointing"}, host)
    assert recompute_attention.mode == "low" and len(recompute_attention.swapped) < len(plans[21.5].swapped)
    config.selective_checkpointing = True
    # On a 32 GiB host (16 GiB to pin) the extra swaps do not fit: low recomputes attention instead, and at
    # 15 GiB only minimal (inputs offloaded too) fits.
    small = {gib: choose_plan(config, costs, gib * GIB, set(), 16 * GIB) for gib in (21.5, 15)}
    assert small[21.5].mode == "low" and not small[21.5].selective and small[21.5].host_bytes <= 16 * GIB
    assert small[15].mode == "minimal"
    with pytest.raises(UserError, match="smallest memory mode needs"):
        choose_plan(config, costs, 4 * GIB, set())


def test_a_chosen_mode_sizes_itself_and_user_knobs_win():
    config = TrainConfig(base_model_precision="int8-quanto", memory_mode="low")
    costs = real_size_costs(config, EDIT_V1_TOKENS)
    low = choose_plan(config, costs, 21.5 * GIB, set())
    assert low.mode == "low" and not low.offload_activations and len(low.checkpointed) == 60
    # SimpleTuner's keys keep their meaning: every block, or every n-th
    config.gradient_checkpointing, config.gradient_checkpointing_interval = True, 3
    knobs = {"gradient_checkpointing", "gradient_checkpointing_interval", "blocks_to_swap", "offload_activations"}
    config.blocks_to_swap, config.offload_activations, config.memory_mode = 0, False, "fast"
    chosen = choose_plan(config, costs, 0.0, knobs)
    assert chosen.checkpointed == frozenset(range(0, 60, 3)) and chosen.swapped == ()
    assert not chosen.offload_activations
    config.blocks_to_swap = 30  # swapped blocks need not be checkpointed: backward copies them in again
    chosen = choose_plan(config, costs, 0.0, knobs)
    assert chosen.swapped == tuple(spread(30, 60)) and chosen.checkpointed == frozenset(range(0, 60, 3))
    config.selective_checkpointing = False
    assert (
        choose_plan(config, costs, 0.0, knobs).selective
        and not choose_plan(config, costs, 0.0, knobs | {"selective_checkpointing"}).selective
    )


def test_spread_alternates_blocks():
    assert spread(0, 60) == []
    assert spread(30, 60) == list(range(0, 60, 2)) or spread(30, 60) == list(range(1, 60, 2))
    assert len(spread(7, 60)) == 7 and len(spread(60, 60)) == 60


def test_the_plan_says_what_it_costs_and_warns_when_a_forced_mode_will_not_fit():
    config = TrainConfig(base_model_precision="int8-quanto", memory_mode="fast")
    costs = real_size_costs(config, EDIT_V1_TOKENS)
    forced = choose_plan(config, costs, 21.5 * GIB, {"memory_mode"})
    assert forced.mode == "fast" and len(forced.checkpointed) == 60  # its smallest setting
    assert "warning: memory_mode fast is estimated to need more than the budget" in forced.describe()
    config.memory_mode = "auto"
    fits = choose_plan(config, costs, 21.5 * GIB, set())
    assert "warning" not in fits.describe()
    assert f"{len(fits.swapped)} swapped to host ({len(fits.swapped) * costs.block_pinned / GIB:.1f} GiB pinned)" in (
        fits.describe()
    )


def test_int4_and_fp8uz_quanto_blocks_run_uncompiled_and_an_explicit_compile_is_refused():
    # A real model's int4 layers (bf16, multiples of 128 wide) take quanto's tinygemm layout: eager forward and
    # backward work; compiled they fail (on the H200, `train run` stopped with an internal error at its first step).
    from optimum.quanto import freeze, qint4, quantize

    layer = torch.nn.Sequential(torch.nn.Linear(256, 128)).to(torch.bfloat16)
    quantize(layer, weights=qint4)
    freeze(layer)
    assert type(layer[0].weight).__name__ == "TinyGemmWeightQBitsTensor"
    x = torch.randn(3, 256, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch._dynamo.reset()
    # as on the H200: compiling fails, and quanto's own error message then fails on the tinygemm layout;
    # when this passes, int4 blocks may compile again
    with pytest.raises(RuntimeError, match="'TinyGemmWeightQBitsTensor' object has no attribute '_scale'"):
        torch.compile(layer, fullgraph=True)(x.detach().requires_grad_())

    gpu = True  # what a GPU run would choose
    assert compile_blocks(TrainConfig(base_model_precision="int8-quanto"), set(), gpu)
    assert not compile_blocks(TrainConfig(base_model_precision="int4-quanto"), set(), gpu)
    assert not compile_blocks(TrainConfig(base_model_precision="fp8uz-quanto"), set(), gpu)  # Triton: no e4m3fnuz
    explicit = TrainConfig(base_model_precision="int4-quanto", compile_blocks=True)
    with pytest.raises(UserError, match="compile_blocks: true cannot be used with base_model_precision int4-quanto"):
        compile_blocks(explicit, {"compile_blocks"}, gpu)
    assert not compile_blocks(TrainConfig(base_model_precision="int4-quanto"), {"compile_blocks"}, gpu)
