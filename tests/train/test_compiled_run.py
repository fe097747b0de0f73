"""Compiled blocks inside the real run: every memory lever on, previews and the held-out loss before and between
steps, batches of two with prompts of different lengths. What crashed `train run` in the 24 GB mode on a GPU
(previews compiled no-grad graphs into the training blocks' cache; the recompile limit sent the checkpointed
recomputation to other code than its forward) must finish here, with a known set of graphs."""

from __future__ import annotations

import json

import pytest
import torch
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

from demo.data import write_demo_dataset
from prep.build import build_cache
from shared.config import load_config
from tests.conftest import write_config
from train import blocks
from train.blocks import INFERENCE_GRAPHS, TRAINING_GRAPHS
from train.objective import flow_matching_loss
from train.run import Run

SETTINGS = {
    "compile_blocks": True,
    # the first block checkpointed whole (selective checkpointing is tests/train/test_memory.py's compiled case), the
    # second plain: both training functions compiled in one run
    "gradient_checkpointing": True,
    "gradient_checkpointing_interval": 2,
    "selective_checkpointing": False,
    "offload_activations": True,
    "blocks_to_swap": 2,
    "train_batch_size": 2,
    "max_train_steps": 4,
    "eval_holdout": 2,
    "validation_resolution": 192,  # eval samples cached at another size than the 256² training buckets
    "validation_step_interval": 2,
    "validation_num_inference_steps": 2,
    "use_ema": True,
    "checkpointing_steps": 2,
    "dataloader_num_workers": 0,
    # scheduled sampling: the rollout's forwards (no autograd, training mode) take the inference graphs
    "scheduled_sampling_max_step_offset": 2,
    "scheduled_sampling_probability": 1.0,
}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("compiled")
    data = write_demo_dataset(root / "data", n_samples=10, n_references=1)
    for i, caption in enumerate(sorted((data / "images").glob("*.txt"))):  # prompts of several lengths
        caption.write_text(caption.read_text().strip() + " and keep the rest" * (i % 2) + "\n")
    path = write_config(root, tiny_models["edit-v1"], "edit-v1", data, 1, train=SETTINGS)
    build_cache(load_config(path), device="cpu")
    return path


def with_settings(path, out, **changes):
    config = json.loads(path.read_text())
    config.update(changes, output_dir=str(out))
    new = out.with_suffix(".json")
    new.write_text(json.dumps(config))
    return load_config(new)


def graphs(*functions) -> int:
    """Graphs Dynamo holds for these functions (it keeps them per code object)."""
    return sum(len(_debug_get_cache_entry_list(f.__code__)) for f in functions)


def training_graphs() -> int:
    return graphs(blocks._plain_block, blocks._checkpointed_block, blocks._selectively_checkpointed_block)


def inference_graphs() -> int:
    return graphs(blocks._inference_block)


def loss_and_gradients(run: Run, batch, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with run.accelerator.autocast():
        noise = torch.Generator(run.accelerator.device).manual_seed(seed)
        loss = flow_matching_loss(run.transformer, batch, run.schedule, noise)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in run.params.items()}
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_compiled_run_with_every_lever_trains_through_previews_on_a_known_set_of_graphs(config_path, tmp_path):
    run = Run(with_settings(config_path, tmp_path / "compiled"))
    plan = run.plan
    assert plan.compile_blocks and plan.offload_activations and plan.checkpointed == {0} and plan.n_blocks == 2
    assert not plan.selective
    assert len(plan.swapped) == 2

    # Previews (LoRA off, at another resolution) and the held-out loss first: they compile a graph of their own,
    # none of the training step's (every block alike: the default lora_target leaves the text stream alone).
    run.validate(0, baseline=True)
    assert (tmp_path / "compiled" / "previews" / "step-000000-base.png").is_file()
    assert training_graphs() == 0 and inference_graphs() == 1

    # The step's loss and LoRA gradients equal the eager path's at the same weights, within bf16 rounding.
    eager = Run(with_settings(config_path, tmp_path / "eager", compile_blocks=False))
    assert not eager.plan.compile_blocks
    with torch.no_grad():
        for name, p in run.params.items():
            if "lora_B" in name:  # non-zero, so every lora_A gets a gradient too
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
            eager.params[name].copy_(p)
    # The held-out loss through the compiled inference graphs equals the eager blocks' (bf16 rounding apart).
    torch.testing.assert_close(
        run.validator.heldout_loss(run.model), eager.validator.heldout_loss(eager.model), rtol=1e-2, atol=0
    )
    batch = next(run.batches).to(run.accelerator.device)
    want_loss, want = loss_and_gradients(eager, batch)
    loss, grads = loss_and_gradients(run, batch)
    torch.testing.assert_close(loss, want_loss, rtol=1e-2, atol=0)
    errors = sorted(((grads[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12)).item() for n in want)
    assert errors[len(errors) // 2] < 0.02 and errors[-1] < 0.1, errors  # a wrong computation is off by ~100%
    assert graphs(blocks._checkpointed_block) > 0 and graphs(blocks._plain_block) > 0  # both ran compiled
    with torch.no_grad():
        for name, p in run.params.items():
            if "lora_B" in name:
                p.zero_()  # back to peft's initialisation

    # Training with previews, held-out loss, EMA previews and checkpoints between steps: a graph is compiled
    # only on the first step of a prompt layout not seen before (padded under a mask, or not), never after.
    layouts, seen = [], set()
    batches = run.batches

    def recording():
        for batch in batches:
            layouts.append(batch.prompt_mask is not None)
            yield batch

    run.batches = recording()
    while run.step_count < run.max_steps:
        before = training_graphs()
        run.step()
        step, last = run.step_count, run.step_count == run.max_steps
        run.flush_metrics()
        new_layout = layouts[-1] not in seen
        seen.add(layouts[-1])
        assert training_graphs() == before or new_layout, f"step {step} compiled a graph for a layout seen before"
        if run.validation_due(step, last):
            run.validate(step, last)
        if run.checkpoint_due(step, last):
            run.save_checkpoint(step)
    lora = run.finish()
    assert lora.is_file()
    assert len(set(layouts)) == 2, "the data should give padded and unpadded batches"
    assert training_graphs() <= TRAINING_GRAPHS and inference_graphs() <= INFERENCE_GRAPHS
    assert inference_graphs() > 1  # the rollout's forwards (training mode) ran compiled too
    previews = tmp_path / "compiled" / "previews"
    assert {p.name for p in previews.glob("*.png")} >= {"step-000002.png", "step-000004-ema.png"}
    assert (tmp_path / "compiled" / "checkpoints" / "checkpoint-000004").is_dir()


def test_more_graphs_than_planned_is_a_clear_error_not_a_silent_fallback_to_eager_code(config_path, tmp_path):
    from shared.errors import InternalError

    # both blocks checkpointed: one function, a graph for the first block and one for the last
    settings = dict(blocks_to_swap=0, offload_activations=False, gradient_checkpointing_interval=1)
    run = Run(with_settings(config_path, tmp_path / "run", **settings))
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 1  # as if the blocks needed more graphs than planned
    try:
        with pytest.raises(InternalError, match="needed more than the .* graphs planned.*compile_blocks: false"):
            run.step()
    finally:
        torch._dynamo.config.recompile_limit = limit


def test_previews_that_need_more_graphs_than_planned_run_eagerly_and_say_so_once(config_path, tmp_path, caplog):
    # Both streams adapted but the last block's text query: the last block needs a second inference graph.
    settings = dict(blocks_to_swap=0, offload_activations=False, lora_target="attention")
    run = Run(with_settings(config_path, tmp_path / "run", **settings))
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 1
    try:
        run.validate(0, baseline=True)
    finally:
        torch._dynamo.config.recompile_limit = limit
    assert (tmp_path / "run" / "previews" / "step-000000-base.png").is_file()
    warnings = [r for r in caplog.records if "run without compiling from now on" in r.getMessage()]
    assert len(warnings) == 1 and "training is not affected" in warnings[0].getMessage()
