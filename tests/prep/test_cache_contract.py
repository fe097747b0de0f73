"""What the cache promises beyond its bytes: what invalidates it, what a rebuild re-reads, who may write it."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image
from safetensors.torch import load as load_safetensors
from typer.testing import CliRunner

from prep.build import build_cache
from prep.cli import app
from prep.validate import validate
from shared.cache import LOCK, CacheLock
from shared.config import load_config
from shared.errors import UserError
from tests.cache_files import manifest_rows, member_bytes, stored_tensors


def _set_keys(config_path, **keys) -> None:
    raw = json.loads(config_path.read_text())
    raw.update(keys)
    config_path.write_text(json.dumps(raw))


def _count_decodes(monkeypatch) -> list[str]:
    """Every image file PIL opens from now on (validation's decodes and the encoder's)."""
    opened = []
    real = Image.open

    def counting(fp, *args, **kwargs):
        opened.append(str(fp))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return opened


def test_training_only_keys_never_invalidate_the_cache_and_dropout_is_always_cached(demo_project, monkeypatch):
    config_path = demo_project("edit-v1", n_samples=3)
    (cache,) = build_cache(load_config(config_path), device="cpu")
    for row in manifest_rows(cache):
        assert "dropout" in stored_tensors(member_bytes(cache, row, "embeds.safetensors"))
        # stored once: the rows it shares with the caption's embedding (template, image tokens) are not repeated
        raw = load_safetensors(member_bytes(cache, row, "embeds.safetensors"))
        assert set(raw) == {"prompt.0", "dropout.after", "dropout.shared_rows"}
        assert raw["dropout.after"].shape[0] < 0.05 * raw["prompt.0"].shape[0]
    before = (cache / "manifest.parquet").read_bytes()

    _set_keys(config_path, seed=1234, caption_dropout_probability=0.2, learning_rate=3e-4, max_train_steps=7)
    opened = _count_decodes(monkeypatch)
    build_cache(load_config(config_path), device="cpu")  # no --force: reused as it is
    assert opened == [], "nothing changed that is cached, so no image is decoded or encoded again"
    assert (cache / "manifest.parquet").read_bytes() == before


def test_random_crops_take_their_seed_from_crop_seed(demo_project, tmp_path):
    config_path = demo_project("edit-v1", n_samples=2)
    backend_path = tmp_path / "multidatabackend.json"
    backend = json.loads(backend_path.read_text())
    backend[0].update(crop=True, crop_style="random", crop_aspect="square")
    backend_path.write_text(json.dumps(backend))
    build_cache(load_config(config_path), device="cpu")
    _set_keys(config_path, seed=99)
    build_cache(load_config(config_path), device="cpu")  # the training seed does not move random crops
    _set_keys(config_path, crop_seed=5)
    with pytest.raises(UserError, match=r"changed: crop_seed"):
        build_cache(load_config(config_path), device="cpu")


def test_a_rebuild_with_nothing_changed_decodes_no_image_and_a_changed_file_is_decoded_again(
    demo_project, tmp_path, monkeypatch
):
    config_path = demo_project("edit-v1", n_samples=4)
    build_cache(load_config(config_path), device="cpu")
    opened = _count_decodes(monkeypatch)
    report = validate(load_config(config_path))
    assert report.trainable and report.decoded == 0 and opened == []

    changed = tmp_path / "data" / "images" / "pair_0002.png"
    Image.new("RGB", (256, 256), "white").save(changed)
    os.utime(changed, ns=(1, 1))  # even with an old mtime, the size or inode differs
    report = validate(load_config(config_path))
    assert report.decoded == 1 and opened == [str(changed)]


def test_two_builds_cannot_write_one_cache_and_a_killed_builds_lock_is_not_in_the_way(demo_project, tmp_path):
    config_path = demo_project("edit-v1", n_samples=2)
    cache_dir = load_config(config_path).cache_dir_for(load_config(config_path).main_datasets()[0])
    with CacheLock(cache_dir, LOCK):  # as a running build holds it
        result = CliRunner().invoke(app, ["build-cache", "--config", str(config_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"another `prep build-cache` is writing this cache: pid {os.getpid()}" in result.output
    assert not (cache_dir / "manifest.parquet").exists()

    # A build killed with the lock held leaves its name in the file, but the kernel dropped its flock.
    (cache_dir / LOCK).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then", "command": "x"}))
    result = CliRunner().invoke(app, ["build-cache", "--config", str(config_path)])
    assert result.exit_code == 0, result.output
    assert "the build by pid 999999" in result.output and "was stopped; continuing it" in result.output
    assert (cache_dir / LOCK).read_text() == "", "released cleanly"


def test_an_image_blown_up_more_than_2x_is_a_warning_with_its_factor(demo_project, tmp_path):
    config_path = demo_project("edit-v1", n_samples=3)
    for folder in ("images", "reference"):
        Image.new("RGB", (64, 64), "red").save(tmp_path / "data" / folder / "pair_0001.png")
    report = validate(load_config(config_path))
    assert report.trainable
    (warning,) = [f for f in report.warnings if f.kind == "image upscaled more than 2x" and "images" in f.path]
    assert "64x64 is upscaled 4.0x per side" in warning.message


def test_a_deleted_or_truncated_shard_is_encoded_again_not_reported_up_to_date(demo_project):
    config = load_config(demo_project("edit-v1", n_samples=3))
    (cache,) = build_cache(config, device="cpu", max_shard_bytes=1)  # one sample per shard
    rows = sorted(manifest_rows(cache), key=lambda r: r["shard"])
    (cache / rows[0]["shard"]).unlink()
    truncated = cache / rows[1]["shard"]
    truncated.write_bytes(truncated.read_bytes()[:1000])
    build_cache(config, device="cpu", max_shard_bytes=1)
    result = CliRunner().invoke(app, ["verify", str(cache)])
    assert result.exit_code == 0 and "intact" in result.output
    assert sorted(r["sample_id"] for r in manifest_rows(cache)) == sorted(r["sample_id"] for r in rows)


@pytest.mark.parametrize("force", [False, True], ids=["rebuild", "rebuild --force"])
def test_an_emptied_cache_json_or_a_truncated_manifest_is_repaired_by_the_next_build(demo_project, force):
    config = load_config(demo_project("edit-v1", n_samples=3))
    (cache,) = build_cache(config, device="cpu")
    ids = sorted(r["sample_id"] for r in manifest_rows(cache))

    (cache / "cache.json").write_text("")
    build_cache(config, device="cpu", force=force)
    assert CliRunner().invoke(app, ["verify", str(cache)]).exit_code == 0

    manifest = cache / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[:300])
    result = CliRunner().invoke(
        app, ["build-cache", "--config", str(config.config_path)] + (["--force"] if force else [])
    )
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "up to date" not in result.output.splitlines()[-2]
    verified = CliRunner().invoke(app, ["verify", str(cache)])
    assert verified.exit_code == 0 and "intact" in verified.output
    assert sorted(r["sample_id"] for r in manifest_rows(cache)) == ids
