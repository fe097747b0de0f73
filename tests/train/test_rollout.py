"""Scheduled sampling (rollout) as SimpleTuner 4.10 does it for flow models: the same plan from the same draws, the
same rolled-out latents and loss as a transcription of its code on the tiny model, and a run that trains with it in
`low` mode. The `reference_*` functions follow SimpleTuner's `helpers/scheduled_sampling/plan.py`,
`rollout.py::_apply_flow_matching_rollout` and `models/common.py` (probability ramp, ReflexFlow loss) line by line,
with its model call (`model_predict`: timestep / 1000) replaced by ours."""

from __future__ import annotations

import json
import math

import pytest
import torch

from demo.data import write_demo_dataset
from prep.build import build_cache
from shared.config import TrainConfig, load_config
from shared.config_report import ignored_report, resolved
from tests.conftest import write_config
from train.batch import Batch
from train.model import load_lora_transformer
from train.objective import SigmaSchedule, flow_matching_loss, predict_velocity, sample_velocity
from train.packing import pack_latents
from train.rollout import RolloutPlan, ScheduledSampling
from train.run import Run

SETTINGS = {"scheduled_sampling_max_step_offset": 3, "scheduled_sampling_probability": 0.5}


def rollout(**settings) -> ScheduledSampling:
    return ScheduledSampling.from_config(TrainConfig(**{**SETTINGS, **settings}))


def reference_plan(base_timesteps, max_step_offset, strategy, apply_probability):
    """SimpleTuner's `build_rollout_schedule` (its global RNG: seeded by the caller)."""
    batch_size = base_timesteps.shape[0]
    base = base_timesteps.view(batch_size).long()
    if apply_probability is not None and apply_probability < 1.0:
        mask = torch.bernoulli(torch.full((batch_size,), apply_probability)).bool()
    else:
        mask = torch.ones((batch_size,), dtype=torch.bool)
    if strategy == "uniform":
        offsets = torch.randint(0, max_step_offset + 1, (batch_size,))
    elif strategy == "biased_early":
        offsets = torch.round(torch.rand((batch_size,)) ** 2 * max_step_offset).to(torch.long)
    else:
        offsets = torch.round((1.0 - torch.rand((batch_size,)) ** 2) * max_step_offset).to(torch.long)
    offsets = offsets * mask
    source = torch.clamp(base + offsets, max=999)
    return base, source, offsets


@pytest.mark.parametrize("strategy", ["uniform", "biased_early", "biased_late"])
@pytest.mark.parametrize("probability", [0.3, 1.0])
def test_plan_is_simpletuners_from_the_same_draws(strategy, probability):
    sigma = torch.rand(64, generator=torch.Generator().manual_seed(5)) * 0.999
    ours = rollout(scheduled_sampling_strategy=strategy, scheduled_sampling_probability=probability)
    plan = ours.plan(sigma, step=0, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(11)
    base, source, offsets = reference_plan(sigma * 1000, 3, strategy, probability)
    assert torch.equal(plan.target, base) and torch.equal(plan.source, source) and torch.equal(plan.offsets, offsets)
    assert 0 < int((plan.offsets > 0).sum()) and int(plan.offsets.max()) <= 3


def reference_probability(config: TrainConfig, global_step: int) -> float:
    """SimpleTuner's `effective_prob` (models/common.py, before `build_rollout_schedule`)."""
    effective_prob = float(config.scheduled_sampling_probability or 0.0)
    prob_start = float(config.scheduled_sampling_prob_start or effective_prob)
    prob_end = float(config.scheduled_sampling_prob_end or effective_prob)
    ramp_steps, ramp_start = config.scheduled_sampling_ramp_steps, config.scheduled_sampling_start_step
    if ramp_steps > 0 and global_step >= ramp_start:
        progress = min(1.0, max(0.0, (global_step - ramp_start) / max(ramp_steps, 1)))
        if config.scheduled_sampling_ramp_shape == "cosine":
            progress = 0.5 - 0.5 * math.cos(math.pi * progress)
        return prob_start + (prob_end - prob_start) * progress
    return prob_start if ramp_steps > 0 else effective_prob


@pytest.mark.parametrize(
    "settings",
    [
        {},  # no ramp: the probability
        {"scheduled_sampling_ramp_steps": 10},  # from the probability (start unset) to prob_end's default 0.5
        {
            "scheduled_sampling_ramp_steps": 10,
            "scheduled_sampling_prob_start": 0.1,
            "scheduled_sampling_prob_end": 0.9,
            "scheduled_sampling_start_step": 5,
            "scheduled_sampling_ramp_shape": "cosine",
        },
    ],
)
def test_probability_ramp_is_simpletuners(settings):
    config = TrainConfig(**{**SETTINGS, "scheduled_sampling_probability": 0.2, **settings})
    ours = ScheduledSampling.from_config(config)
    for step in range(0, 30, 3):
        assert ours.probability_at(step) == pytest.approx(reference_probability(config, step), abs=1e-12), step


def test_an_offset_without_a_probability_says_nothing_rolls_out_but_reflexflow_still_counts():
    """SimpleTuner's defaults make this easy to miss: the run says it at its start."""
    line = rollout(scheduled_sampling_probability=0.0).describe()
    assert "WARNING: scheduled_sampling_probability is 0" in line and "direction term (x10)" in line
    assert "WARNING" not in rollout().describe()
    assert "WARNING" not in rollout(scheduled_sampling_probability=0.0, scheduled_sampling_ramp_steps=5).describe()


def test_offset_zero_is_off_and_costs_nothing():
    assert ScheduledSampling.from_config(TrainConfig()) is None
    assert ScheduledSampling.from_config(TrainConfig(scheduled_sampling_probability=1.0)) is None


@pytest.fixture(scope="module")
def model_and_batch(tiny_models):
    config = TrainConfig(pretrained_model_name_or_path=str(tiny_models["edit-v1"]), base_model_precision="int8-quanto")
    transformer, _ = load_lora_transformer(config, torch.device("cpu"), tokens=64)
    with torch.no_grad():  # a LoRA that has learnt something, so it changes the velocity
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    g = torch.Generator().manual_seed(2)
    batch = Batch(
        target=torch.randn(3, 16, 8, 12, generator=g).bfloat16(),
        references=[torch.randn(3, 16, 8, 8, generator=g).bfloat16()],
        prompt=torch.randn(3, 9, 32, generator=g).bfloat16(),
        prompt_mask=torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 9]),
    )
    return transformer, batch


def reference_rollout(transformer, batch, x0, noise, sigma, target_ts, source_ts, rollout_steps):
    """SimpleTuner's `_apply_flow_matching_rollout` with ReflexFlow on (its float arithmetic, our model call)."""

    def model_predict(i, noisy_latents, timesteps):  # SimpleTuner's Qwen model_predict: timestep / 1000
        return sample_velocity(transformer, batch, i, noisy_latents, timesteps / 1000.0)

    denom = 999.0
    base_noisy = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
    base_timesteps = sigma * 1000
    clean_preds, biased_preds = torch.zeros_like(x0), torch.zeros_like(x0)
    new_noisy, new_timesteps = base_noisy.clone(), base_timesteps.clone()
    for i in range(x0.shape[0]):
        offset, target_t, source_t = int(rollout_steps[i]), int(target_ts[i]), int(source_ts[i])
        clean_preds[i : i + 1] = model_predict(i, base_noisy[i : i + 1], base_timesteps[i : i + 1])
        if offset <= 0 or source_t <= target_t:
            biased_preds[i : i + 1] = clean_preds[i : i + 1]
            continue
        source_frac = float(source_t) / denom
        current = (1 - source_frac) * x0[i : i + 1] + source_frac * noise[i : i + 1]
        current_frac = source_frac
        for t in range(source_t, target_t, -1):
            if t <= 0:
                break
            next_t = max(target_t, t - 1)
            next_frac = float(next_t) / denom
            model_pred = model_predict(i, current, torch.tensor([t], dtype=torch.float32))
            current = current + (next_frac - current_frac) * model_pred.float()
            current_frac = next_frac
        biased_preds[i : i + 1] = model_predict(i, current, torch.tensor([target_t], dtype=torch.float32))
        new_noisy[i : i + 1] = current
        new_timesteps[i] = target_t
    return new_noisy, new_timesteps / 1000, clean_preds, biased_preds


def reference_loss(model_pred, x0, noise, noisy_latents, clean_pred, biased_pred, alpha=1.0, beta1=10.0, beta2=1.0):
    """SimpleTuner's flow loss with ReflexFlow (models/common.py, `loss`), mean over the batch."""
    loss = torch.nn.functional.mse_loss(model_pred.float(), (noise - x0).float(), reduction="none")
    exposure = (clean_pred - biased_pred).detach()
    norm_dims = tuple(range(1, exposure.dim()))
    exposure_norm = exposure.abs().sum(dim=norm_dims, keepdim=True).clamp_min(1e-6)
    loss = loss * (1.0 + alpha * exposure / exposure_norm) * beta2
    target_vec = noisy_latents - x0
    flat_target, flat_pred = target_vec.reshape(target_vec.shape[0], -1), model_pred.reshape(model_pred.shape[0], -1)
    target_dir = flat_target / torch.norm(flat_target, dim=1, keepdim=True).clamp_min(1e-6)
    pred_dir = flat_pred / torch.norm(flat_pred, dim=1, keepdim=True).clamp_min(1e-6)
    adr = (pred_dir - target_dir).pow(2).sum(dim=1)
    return (loss.mean(dim=list(range(1, len(loss.shape)))) + beta1 * adr).mean()


@pytest.mark.parametrize("reflexflow", [True, False])
def test_rollout_and_loss_equal_simpletuners_on_the_tiny_model(model_and_batch, reflexflow):
    transformer, batch = model_and_batch
    ours = rollout(scheduled_sampling_probability=1.0, scheduled_sampling_reflexflow=reflexflow)
    g = torch.Generator().manual_seed(0)
    x0 = pack_latents(batch.target.float())  # [B, N, 4C]
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.6, 0.3, 0.9995])  # the last: source clamped to 999 = its target: not rolled out
    target = (sigma * 1000).long()
    offsets = torch.tensor([2, 3, 1])  # a plan (its draws are tested above)
    plan = RolloutPlan(target, torch.clamp(target + offsets, max=999), offsets)
    assert int(plan.source[2]) == int(plan.target[2]) == 999
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rolled = ours.roll_out(lambda i, n, t: sample_velocity(transformer, batch, i, n, t), x0, noise, sigma, plan)
        want_noisy, want_t, clean, biased = reference_rollout(
            transformer, batch, x0, noise, sigma, plan.target, plan.source, plan.offsets
        )
        assert torch.equal(rolled.noisy, want_noisy) and torch.equal(rolled.timestep, want_t)
        assert not torch.equal(rolled.noisy[:2], ((1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise)[:2])
        if reflexflow:
            assert torch.equal(rolled.exposure, clean - biased)
        prediction = predict_velocity(transformer, batch, rolled.noisy, rolled.timestep)
    loss = ours.errors(prediction, x0, noise, rolled).mean()
    if reflexflow:
        # float32 throughout (SimpleTuner's direction term runs in the prediction's bf16: 0.1% apart here)
        want = reference_loss(prediction.float(), x0, noise, want_noisy, clean, biased)
    else:
        want = torch.nn.functional.mse_loss(prediction.float(), noise - x0)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)


def test_loss_with_nothing_rolled_out_still_adds_reflexflows_direction_term(model_and_batch):
    """SimpleTuner's default: an offset with probability 0 rolls nothing out, and ReflexFlow (on by default for flow
    models) still adds beta1 times the direction term; with ReflexFlow off the loss is the plain one."""
    transformer, batch = model_and_batch
    plain = SigmaSchedule(shift=1.73)
    losses = {}
    for name, extra in (("off", None), ("reflex", {}), ("no reflex", {"scheduled_sampling_reflexflow": False})):
        ss = None if extra is None else rollout(scheduled_sampling_probability=0.0, **extra)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses[name] = flow_matching_loss(transformer, batch, plain, torch.Generator().manual_seed(4), ss)
    assert losses["reflex"] > losses["off"] + 1  # 10 × a squared distance between directions
    # the plan draws (bernoulli, offsets) come after σ and the noise: the loss's inputs are the same
    torch.testing.assert_close(losses["no reflex"], losses["off"], rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("rollout")
    data = write_demo_dataset(root / "data", n_samples=6, n_references=1)
    settings = {
        # SimpleTuner's keys as its documents spell them
        "scheduled_sampling_max_step_offset": 3,
        "scheduled_sampling_probability": 1.0,
        "scheduled_sampling_strategy": "biased_late",
        "scheduled_sampling_sampler": "unipc",
        "scheduled_sampling_order": 2,
        "scheduled_sampling_reflexflow": None,  # unset: SimpleTuner turns it on for flow models
        "memory_mode": "low",
        "max_train_steps": 2,
        "eval_holdout": 0,
        "dataloader_num_workers": 0,
        "checkpointing_steps": 0,
    }
    path = write_config(root, tiny_models["edit-v1"], "edit-v1", data, 1, train=settings)
    build_cache(load_config(path), device="cpu")
    return path


def test_simpletuner_config_with_scheduled_sampling_reads_every_key(config_path):
    config = load_config(config_path)
    assert not [line for line in ignored_report(config) if "scheduled_sampling" in line]
    assert config.train.scheduled_sampling_reflexflow is True
    lines = "\n".join(resolved(config))
    assert "scheduled_sampling_strategy = 'biased_late'" in lines
    assert "scheduled_sampling_prob_end = 0.5  [default, as SimpleTuner's]" in lines


def test_trains_in_low_mode_with_the_rollout(config_path, tmp_path):
    config = json.loads(config_path.read_text())
    config["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    run = Run(load_config(path))
    assert run.plan.mode == "low" and run.rollout is not None and run.rollout.reflexflow
    calls = []
    run.rollout = CountingRollout(run.rollout, calls)
    while run.step_count < run.max_steps:
        result = run.step()
    assert torch.isfinite(result.loss) and len(calls) == 2 and sum(len(offsets) for offsets in calls) > 0


class CountingRollout:
    """The run's ScheduledSampling, recording each micro-batch's offsets."""

    def __init__(self, inner: ScheduledSampling, calls: list):
        self.inner, self.calls = inner, calls

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def roll_out(self, predict, x0, noise, sigma, plan):
        self.calls.append([o for o in plan.offsets.tolist() if o > 0])
        return self.inner.roll_out(predict, x0, noise, sigma, plan)
