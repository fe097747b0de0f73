"""prep build-cache: members located by the manifest, bad pairing stopped early, incremental and crash-safe."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import prep.build
import prep.encode
import prep.encode_workers
from prep.build import build_cache
from prep.cli import app
from prep.verify import verify_cache
from shared.cache import DROPOUT, DROPOUT_SHARD, EMBEDS, MEMBERS, Latents, member_column
from shared.config import load_config
from shared.errors import UserError
from tests.cache_files import manifest_rows, member_bytes, sample_embeddings
from tests.prep.build_child import start_build

LOCATION = {
    "shard",
    "record_offset",
    *(member_column(m, k) for m in MEMBERS for k in ("offset", "size")),
    DROPOUT_SHARD,
    member_column(DROPOUT, "offset"),
}


def _content(rows):
    """Manifest rows without where they sit (shard, offsets): what a rebuild must reproduce exactly."""
    return {r["sample_id"]: {k: v for k, v in r.items() if k not in LOCATION} for r in rows}


HASHES = {"record_sha256", *(member_column(m, "sha256") for m in (*MEMBERS, DROPOUT) if m != "json")}


def _without_hashes(content: dict) -> dict:
    """Also without the embeddings' byte sizes (the member's, so the record's): an embedding is stored as the rows
    after those it shares bit for bit with the caption's (shared/cache/__init__.py), and how many do moves with
    the float rounding that batching changes, as the tensors themselves do (compared within rounding below)."""
    drop = HASHES | {member_column(EMBEDS, "size"), "record_size", member_column(DROPOUT, "size")}
    return {k: {c: v for c, v in row.items() if c not in drop} for k, row in content.items()}


def _tensors(cache, rows):
    """sample id -> every cached tensor; fp32 convolutions on CPU round differently with other thread counts."""
    out = {}
    for row in rows:
        latents = Latents.from_bytes(member_bytes(cache, row, "latents.safetensors"))
        target, refs = latents.target, latents.references
        out[row["sample_id"]] = [
            target,
            *refs,
            *(v for _, v in sorted(sample_embeddings(cache, row).items())),
        ]
    return out


def _count_encodes(monkeypatch):
    encoded = []
    real = prep.encode_workers.encode_prepared

    def counting(batch, *args, **kwargs):
        encoded.extend(p.sample.relpath for p in batch)
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(prep.encode_workers, "encode_prepared", counting)
    return encoded


def _interrupt_at_fourth_sample(monkeypatch):
    """Make encoding stop with a KeyboardInterrupt (a Ctrl-C, a kill) when the fourth sample comes to it."""
    calls = []
    real = prep.encode_workers.encode_prepared

    def interrupting(batch, *args, **kwargs):
        calls.extend(batch)
        if len(calls) >= 4:
            raise KeyboardInterrupt("interrupted")
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(prep.encode_workers, "encode_prepared", interrupting)


def test_manifest_offsets_and_hashes_locate_each_member(demo_project):
    config = load_config(demo_project("edit-v1", n_samples=3))
    (cache,) = build_cache(config, device="cpu")
    rows = manifest_rows(cache)
    assert len({r["sample_id"] for r in rows}) == 3
    for row in rows:
        assert "." not in row["sample_id"]
        with tarfile.open(cache / row["shard"]) as tar:
            for member in MEMBERS:
                data = member_bytes(cache, row, member)
                assert data == tar.extractfile(f"{row['sample_id']}.{member}").read()
                assert hashlib.sha256(data).digest() == row[member_column(member, "sha256")]
        meta = json.loads(member_bytes(cache, row, "json"))
        assert meta["relpath"] == row["relpath"] and meta["captions"] == row["captions"]
        assert [row["width"], row["height"]] == meta["target"]["size"]
    names = sorted(p.name for p in (cache / "shards").iterdir())
    assert names == ["000000.tar", "dropout-000000.tar"], "temporaries were left behind"


@pytest.mark.parametrize("flavour", ["edit-v1", "edit-v2"])
def test_each_reference_goes_through_the_vision_tower_once_per_sample(demo_project, monkeypatch, flavour):
    """A sample's instructions (its caption, the empty caption for dropout, an eval sample's negative)
    share one pass of the processor's image part and of the vision tower."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    seen = {"images": 0, "processed": 0}
    vision_forward = qwen.Qwen2_5_VisionTransformerPretrainedModel.forward

    def counting_forward(self, hidden_states, grid_thw, **kwargs):
        seen["images"] += grid_thw.shape[0]
        return vision_forward(self, hidden_states, grid_thw, **kwargs)

    monkeypatch.setattr(qwen.Qwen2_5_VisionTransformerPretrainedModel, "forward", counting_forward)
    config = load_config(demo_project(flavour, n_samples=4))
    (cache,) = build_cache(config, device="cpu")
    n_refs = 1 if flavour == "edit-v1" else 2
    assert len(manifest_rows(cache)) == 4
    assert seen["images"] == 4 * n_refs  # not once per instruction: every sample has two


def test_missing_reference_stops_before_encoding(demo_project, tmp_path, monkeypatch):
    config_path = demo_project("edit-v1", n_samples=3)
    missing = tmp_path / "data" / "reference" / "pair_0001.png"
    missing.unlink()
    (tmp_path / "data" / "images" / "pair_0002.txt").write_text("\n\n")

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded although the data is not trainable")

    monkeypatch.setattr(prep.encode, "load_vae", no_models)
    result = CliRunner().invoke(app, ["build-cache", "--config", str(config_path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert f"no reference at {missing}" in result.output
    assert "pair_0002.png: no caption" in result.output
    assert not (tmp_path / "cache").exists()


def spoil_after_validation(monkeypatch, spoil) -> None:
    """Call `spoil()` right after `prep build-cache` validated the data: a file changing under a running build."""
    real = prep.build.validate_for_build

    def validate_then_spoil(config):
        report = real(config)
        spoil()
        return report

    monkeypatch.setattr(prep.build, "validate_for_build", validate_then_spoil)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_file_spoiled_after_validation_is_named_and_the_other_samples_are_cached(
    demo_project, tmp_path, monkeypatch, engine, request
):
    if engine == "ray":
        request.getfixturevalue("local_ray")  # the session's Ray (tests/prep/conftest.py), not one of its own
    config_path = demo_project("edit-v1", n_samples=4)
    target, reference = (
        tmp_path / "data" / "images" / "pair_0001.png",
        tmp_path / "data" / "reference" / "pair_0002.png",
    )
    kept = target.read_bytes(), reference.read_bytes()
    spoil_after_validation(monkeypatch, lambda: (target.write_bytes(kept[0][:200]), reference.unlink()))
    result = CliRunner().invoke(app, ["build-cache", "--config", str(config_path), "--engine", engine])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "2 sample(s) could not be read when they came to be encoded" in result.output
    assert f"pair_0001.png: {target}: truncated or corrupt" in result.output
    assert f"pair_0002.png: {reference}: No such file or directory" in result.output
    cache = tmp_path / "cache"
    assert sorted(r["relpath"] for r in manifest_rows(cache)) == ["pair_0000.png", "pair_0003.png"]
    assert verify_cache(str(cache)).intact

    monkeypatch.undo()  # the files mended: only they are encoded
    target.write_bytes(kept[0])
    reference.write_bytes(kept[1])
    encoded = _count_encodes(monkeypatch)
    result = CliRunner().invoke(app, ["build-cache", "--config", str(config_path)])
    assert result.exit_code == 0, result.output
    assert sorted(encoded) == ["pair_0001.png", "pair_0002.png"]
    assert len(manifest_rows(cache)) == 4


def test_rebuild_encodes_exactly_the_changed_added_and_removed_samples(demo_project, tmp_path, monkeypatch):
    config = load_config(demo_project("edit-v1", n_samples=4))
    (cache,) = build_cache(config, device="cpu")
    before = _content(manifest_rows(cache))

    data = tmp_path / "data"
    (data / "images" / "pair_0001.txt").write_text("make the circle blue\n")  # changed caption
    ref = data / "reference" / "pair_0002.png"
    Image.new("RGB", Image.open(ref).size, "white").save(ref)  # changed reference
    for folder in ("images", "reference"):  # removed sample
        (data / folder / "pair_0003.png").unlink()
    shutil.copy(data / "images" / "pair_0000.png", data / "images" / "new.png")  # added sample
    shutil.copy(data / "reference" / "pair_0000.png", data / "reference" / "new.png")
    (data / "images" / "new.txt").write_text("make it green\n")

    encoded = _count_encodes(monkeypatch)
    build_cache(config, device="cpu")
    assert sorted(encoded) == ["new.png", "pair_0001.png", "pair_0002.png"]
    after = _content(manifest_rows(cache))
    assert sorted(r["relpath"] for r in after.values()) == [
        "new.png",
        "pair_0000.png",
        "pair_0001.png",
        "pair_0002.png",
    ]
    unchanged = next(i for i, r in before.items() if r["relpath"] == "pair_0000.png")
    assert after[unchanged] == before[unchanged]

    encoded.clear()
    build_cache(config, device="cpu")
    assert encoded == [], "an unchanged dataset must not be encoded again"


def test_crash_mid_build_keeps_the_old_cache_and_a_rerun_finishes(demo_project, tmp_path, monkeypatch):
    config = load_config(demo_project("edit-v1", n_samples=5))
    reference_cache = build_cache(config, device="cpu", max_shard_bytes=1)[0]  # one record per shard
    expected = _content(manifest_rows(reference_cache))
    shutil.move(reference_cache, tmp_path / "uninterrupted")

    _interrupt_at_fourth_sample(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_cache(config, device="cpu", max_shard_bytes=1)
    assert not (Path(config.cache_location_for(config.main_datasets()[0])) / "manifest.parquet").exists()
    monkeypatch.undo()

    encoded = _count_encodes(monkeypatch)
    (cache,) = build_cache(config, device="cpu", max_shard_bytes=1)
    assert len(encoded) == 2, "the three finished shards must be reused, not encoded again"
    assert _content(manifest_rows(cache)) == expected
    shards = [f"{i:06d}.tar" for i in range(5)] + [f"dropout-{i:06d}.tar" for i in range(5)]  # one record each
    assert sorted(p.name for p in (cache / "shards").iterdir()) == shards


def test_an_interrupted_build_keeps_every_finished_sample_of_its_open_shard(demo_project, tmp_path, monkeypatch):
    """Ctrl-C mid-shard: the samples already encoded are sealed into their shard, and a rerun encodes only the rest."""
    config = load_config(demo_project("edit-v1", n_samples=5))
    expected = _content(manifest_rows(build_cache(config, device="cpu")[0]))
    shutil.rmtree(config.cache_location_for(config.main_datasets()[0]))

    _interrupt_at_fourth_sample(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_cache(config, device="cpu")  # one shard of up to 1 GB: still open when interrupted
    monkeypatch.undo()

    encoded = _count_encodes(monkeypatch)
    (cache,) = build_cache(config, device="cpu")
    assert len(encoded) == 2, "the three samples encoded before the interrupt must be kept"
    assert _content(manifest_rows(cache)) == expected


def test_kill_9_at_any_moment_then_rerun_equals_an_uninterrupted_build(demo_project, tmp_path):
    config_path = demo_project("edit-v1", n_samples=6)
    config = load_config(config_path)
    (cache,) = build_cache(config, device="cpu", max_shard_bytes=1)
    expected = _content(manifest_rows(cache))
    shutil.rmtree(cache)

    proc = start_build(config_path, device="cpu", max_shard_bytes=1)  # a process of its own, killed -9 below
    deadline = time.time() + 120
    while time.time() < deadline and len(list((cache / "shards").glob("*.tar"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert list((cache / "shards").glob("*.tar")), "the build was killed before it wrote a shard"

    (rebuilt,) = build_cache(config, device="cpu", max_shard_bytes=1)
    assert _content(manifest_rows(rebuilt)) == expected


@pytest.mark.parametrize("new_shards", [1, 4], ids=["after-1-new-shard", "after-4-new-shards"])
def test_kill_9_during_a_forced_rebuild_leaves_a_cache_verify_passes_old_or_new(demo_project, tmp_path, new_shards):
    config_path = demo_project("edit-v1", n_samples=6)
    (cache,) = build_cache(load_config(config_path), device="cpu", max_shard_bytes=1)
    old = _content(manifest_rows(cache))
    backend = json.loads((tmp_path / "multidatabackend.json").read_text())
    backend[0]["resolution"] = 288  # other settings: only --force rebuilds
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))

    before = len(list((cache / "shards").glob("*.tar")))
    proc = start_build(config_path, device="cpu", max_shard_bytes=1, force=True)  # its own process, killed -9
    deadline = time.time() + 120
    while time.time() < deadline and len(list((cache / "shards").glob("*.tar"))) < before + new_shards:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()

    result = verify_cache(str(cache))
    assert result.intact, result.problems
    assert _content(manifest_rows(cache)) == old, "the manifest switches only when the new generation is complete"
    assert result.notes, "the new generation's shards left behind are named"
    (rebuilt,) = build_cache(load_config(config_path), device="cpu", max_shard_bytes=1, force=True)
    assert verify_cache(str(rebuilt)).intact and not verify_cache(str(rebuilt)).notes


def test_other_settings_are_refused_unless_forced(demo_project, tmp_path):
    config_path = demo_project("edit-v1", n_samples=2)
    build_cache(load_config(config_path), device="cpu")
    backend = json.loads((tmp_path / "multidatabackend.json").read_text())
    backend[0]["resolution"] = 320
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend))
    config = load_config(config_path)
    with pytest.raises(UserError, match=r"built with other settings \(changed: datasets\).*--force"):
        build_cache(config, device="cpu")
    (cache,) = build_cache(config, device="cpu", force=True)
    assert {(r["height"], r["width"]) for r in manifest_rows(cache)} <= {(320, 320), (288, 384), (384, 288)}


def test_full_disk_is_a_clear_error_and_loses_nothing(demo_project, tmp_path, monkeypatch):
    config = load_config(demo_project("edit-v1", n_samples=2))
    (cache,) = build_cache(config, device="cpu")
    before = manifest_rows(cache)
    (tmp_path / "data" / "images" / "pair_0000.txt").write_text("make it pink\n")

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("shared.cache.writer.ShardFile.write", disk_full)
    with pytest.raises(UserError, match="the disk is full. Nothing already cached was lost"):
        build_cache(config, device="cpu")
    assert manifest_rows(cache) == before


def test_workers_and_shape_batches_give_the_same_cache(demo_project):
    config = load_config(demo_project("edit-v2", n_samples=6))
    (cache,) = build_cache(config, device="cpu")
    rows = manifest_rows(cache)
    expected, expected_tensors = _content(rows), _tensors(cache, rows)
    shutil.rmtree(cache)

    build_cache(config, device="cpu", workers=2, batch_size=3)
    rows = manifest_rows(cache)
    assert _without_hashes(_content(rows)) == _without_hashes(expected)
    for sample_id, tensors in _tensors(cache, rows).items():
        for a, b in zip(tensors, expected_tensors[sample_id], strict=True):
            torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-2)


def test_sigterm_during_a_build_keeps_what_was_encoded_and_says_how_to_go_on(demo_project, monkeypatch):
    config_path = demo_project("edit-v1", n_samples=5)
    calls = []
    real = prep.encode_workers.encode_prepared

    def terminating(batch, *args, **kwargs):
        calls.extend(batch)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler stops the job during the fourth sample
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(prep.encode_workers, "encode_prepared", terminating)
    result = CliRunner().invoke(app, ["build-cache", "--config", str(config_path), "--device", "cpu"])
    assert result.exit_code == 143, result.output
    assert "stopped by SIGTERM: every sample encoded so far is kept" in result.output
    assert f"the same `prep build-cache --config {config_path} ...` again" in result.output
    monkeypatch.undo()

    encoded = _count_encodes(monkeypatch)
    build_cache(load_config(config_path), device="cpu")
    assert len(encoded) == 2, "the three samples encoded before the stop are kept"
