"""The streaming loader on a real cache: worker-independent order, exact resume, URLs, corrupt members, ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch

from demo.data import write_demo_dataset
from prep.build import build_cache
from shared.cache import member_column
from shared.config import load_config
from shared.errors import UserError
from tests.cache_files import manifest_rows
from tests.conftest import write_config
from train.batch import Batch
from train.loader import CacheReader, TrainLoader


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_models) -> Path:
    """An edit-v1 cache of 12 samples: 3 shapes x 4, some with several captions."""
    root = tmp_path_factory.mktemp("loader")
    data = write_demo_dataset(root / "data", n_samples=12, n_references=1)
    config = write_config(root, tiny_models["edit-v1"], "edit-v1", data, 1, train={"eval_holdout": 0})  # all train
    (cache_dir,) = build_cache(load_config(config), "cpu")
    return cache_dir


def _take(loader: TrainLoader, n: int) -> list[Batch]:
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


def _same(a: list[Batch], b: list[Batch]) -> None:
    assert [x.sample_ids for x in a] == [y.sample_ids for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.target, y.target) and torch.equal(x.prompt, y.prompt)
        assert all(torch.equal(r, s) for r, s in zip(x.references, y.references, strict=True))


def test_order_is_the_same_for_0_1_and_3_workers(cache):
    runs = [_take(TrainLoader([CacheReader(cache)], 2, seed=7, workers=w), 8) for w in (0, 1, 3)]
    _same(runs[0], runs[1])
    _same(runs[0], runs[2])


def test_resume_after_k_batches_continues_with_exactly_the_next_batch(cache):
    straight = _take(TrainLoader([CacheReader(cache)], 2, seed=7, workers=2), 11)  # crosses an epoch (6 batches)

    first = TrainLoader([CacheReader(cache)], 2, seed=7, workers=2)
    _take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert state["position"] == 4  # batches handed out, not batches the workers read ahead

    resumed = TrainLoader([CacheReader(cache)], 2, seed=7, workers=3)
    resumed.load_state_dict(state)
    _same(_take(resumed, 7), straight[4:])


def test_batches_hold_one_shape_with_a_mask_over_padded_prompts(cache):
    loader = TrainLoader([CacheReader(cache)], 4, seed=0)
    rows = {r["sample_id"]: r for r in manifest_rows(cache)}
    batches = _take(loader, loader.batches_per_epoch)
    assert sorted(i for b in batches for i in b.sample_ids) == sorted(rows)  # 4 per shape: each sample once
    for batch in batches:
        assert len({(rows[i]["height"], rows[i]["width"]) for i in batch.sample_ids}) == 1
        assert batch.target.shape[0] == batch.prompt.shape[0] == 4
        if batch.prompt_mask is not None:
            assert batch.prompt_mask.shape == batch.prompt.shape[:2]
            assert (batch.prompt[batch.prompt_mask == 0] == 0).all()


def test_reads_from_fsspec_urls(cache):
    local = _take(TrainLoader([CacheReader(cache)], 1, seed=2), 5)
    _same(local, _take(TrainLoader([CacheReader(f"file://{cache}")], 1, seed=2, workers=2), 5))

    memory = fsspec.filesystem("memory")
    for path in cache.rglob("*"):
        if path.is_file():
            memory.pipe(f"/cache-copy/{path.relative_to(cache)}", path.read_bytes())
    _same(local, _take(TrainLoader([CacheReader("memory://cache-copy")], 1, seed=2), 5))


def test_corrupt_member_is_skipped_reported_and_counted(cache, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    rows = manifest_rows(broken)
    victim = rows[0]
    with open(broken / victim["shard"], "r+b") as f:  # flip one byte inside its latents
        f.seek(victim[member_column("latents.safetensors", "offset")] + 200)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))

    loader = TrainLoader([CacheReader(broken)], 2, seed=1, workers=2)
    batches = _take(loader, 2 * loader.batches_per_epoch)  # two epochs, no crash
    assert all(victim["sample_id"] not in b.sample_ids for b in batches)
    assert all(len(b.sample_ids) == 2 for b in batches)  # its place went to a sample of the same shape
    assert loader.skipped == 2  # once per epoch
    out = capsys.readouterr().out
    assert out.count("warning: skipped unreadable sample") == 1
    assert f"{victim['shard']}: sample {victim['sample_id']}: latents.safetensors does not match" in out


def test_a_shape_with_no_readable_sample_is_a_clear_error(cache, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    for shard in {r["shard"] for r in manifest_rows(broken)}:
        (broken / shard).unlink()
    with pytest.raises(UserError, match="prep verify"):
        _take(TrainLoader([CacheReader(broken)], 1, seed=1), 1)


def test_two_gloo_ranks_see_each_sample_once_per_epoch(cache, tmp_path):
    out = tmp_path / "ranks.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523"]
    command += ["-m", "tests.train.loader_ranks", str(cache), "2", str(out)]
    result = subprocess.run(
        command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    per_rank = json.loads(out.read_text())
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 12 samples / global batch 4
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(seen) == sorted(r["sample_id"] for r in manifest_rows(cache))
    # the global order is that of one process with the same global batch
    single = _take(TrainLoader([CacheReader(cache)], 4, seed=3), 3)
    assert [a + b for a, b in zip(*per_rank, strict=True)] == [b.sample_ids for b in single]


def test_resume_with_another_global_batch_continues_at_the_same_point_of_the_epoch(cache, capsys):
    first = TrainLoader([CacheReader(cache)], 2, seed=7)  # 6 batches per epoch
    _take(first, 9)  # epoch 1, half way
    resumed = TrainLoader([CacheReader(cache)], 1, seed=7)  # 12 batches per epoch: another plan
    resumed.load_state_dict(first.state_dict())
    assert resumed.position == 12 + 6
    assert "continuing at epoch 1, batch 6 of the new plan" in capsys.readouterr().out


def test_a_cached_sample_holding_nan_is_named_and_replaced(tmp_path, capsys):
    import json

    from shared.cache import EMBEDS, LATENTS, META, Embeddings, Latents
    from shared.cache.folder import CacheFolder
    from shared.cache.writer import ShardWriter, commit

    writer = ShardWriter(CacheFolder(tmp_path), "fp")
    for i, value in enumerate([0.0, float("nan"), 1.0, 2.0]):
        target = torch.full((16, 4, 4), value)
        members = {
            LATENTS: Latents(target, [torch.zeros(16, 4, 4)]).to_bytes(),
            EMBEDS: Embeddings([torch.zeros(3, 8)], dropout=torch.zeros(2, 8)).to_bytes(),
            META: b"{}",
        }
        row = {"dataset_id": "d", "relpath": f"{i}.png", "split": "train", "height": 32, "width": 32}
        row.update(original_size=[32, 32], crop_box=[0, 0, 32, 32], ref_sizes=[[32, 32]], ref_crop_boxes=[[]])
        row.update(prompt_lens=[3], captions=["c"], source_sha256="0")
        writer.write(f"{i:020x}", members, row)
    writer.finish_shard()
    info = {"format_version": 2, "dataset_id": "d", "flavour": "edit-v1", "fingerprint": {"sha256": "fp"}}
    commit(CacheFolder(tmp_path), writer.rows, writer.shards, info)
    (tmp_path / "cache.json").write_text(json.dumps(info))

    loader = TrainLoader([CacheReader(str(tmp_path))], 2, seed=0)
    batches = _take(loader, loader.batches_per_epoch)
    assert all(f"{1:020x}" not in b.sample_ids for b in batches)
    assert all(torch.isfinite(b.target).all() for b in batches)
    assert f"sample {1:020x}: holds NaN or inf values" in capsys.readouterr().out


def test_random_conditioning_sampling_trains_each_sample_with_one_reference_and_its_embedding(tmp_path, tiny_models):
    """`conditioning_multidataset_sampling: random` (SimpleTuner's): each time a sample is drawn it trains with
    one of its references and the embedding encoded with that reference alone; over an epoch both are used."""
    data = write_demo_dataset(tmp_path / "data", n_samples=8, n_references=2)
    train = {"eval_holdout": 0, "conditioning_multidataset_sampling": "random"}
    config = write_config(tmp_path, tiny_models["edit-v2"], "edit-v2", data, 2, train=train)
    (cache_dir,) = build_cache(load_config(config), "cpu")
    reader = CacheReader(cache_dir, dropout=True)
    cached = {}
    for index in range(len(reader)):
        row = reader.row(index)
        cached[row.sample_id] = reader.load(row)

    loader = TrainLoader([CacheReader(cache_dir, dropout=True)], 2, seed=3, caption_dropout=0.3)
    picked = []
    for batch in _take(loader, 3 * loader.batches_per_epoch):
        assert len(batch.references) == 1  # one reference per sample, not both
        for i, sample_id in enumerate(batch.sample_ids):
            latents, embeds = cached[sample_id]
            (r,) = [r for r, ref in enumerate(latents.references) if torch.equal(ref, batch.references[0][i])]
            alone = embeds.alone[r]
            length = int(batch.prompt_mask[i].sum()) if batch.prompt_mask is not None else batch.prompt.shape[1]
            prompt = batch.prompt[i, :length]
            assert any(torch.equal(prompt, p) for p in [*alone.prompts, alone.dropout])  # reference r's embedding
            picked.append(r)
    assert set(picked) == {0, 1}
