"""What the cache promises beyond its bytes: what invalidates it, what a rebuild re-reads, who may write it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from typer.testing import CliRunner

from prep.build import build_cache
from prep.cli import app
from prep.encode import Encoders
from prep.validate import validate
from prep.verify import verify_cache
from shared.cache import DROPOUT, DROPOUT_SHARD, LOCK, CacheFolder, CacheLock
from shared.config import load_config
from shared.errors import UserError
from tests.cache_files import manifest_rows, member_bytes, sample_embeddings
from train.caches import open_caches


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


def test_training_only_keys_never_invalidate_the_cache(demo_project, monkeypatch):
    config_path = demo_project("edit-v1", n_samples=3)  # caption dropout on (SimpleTuner's default 0.1)
    (cache,) = build_cache(load_config(config_path), device="cpu")
    for row in manifest_rows(cache):
        assert ("dropout" in sample_embeddings(cache, row)) == (row["split"] == "train")
        if row["split"] == "train":  # its own record; stored once: only the rows after those it shares with prompt.0
            raw = load_safetensors(member_bytes(cache, row, DROPOUT))
            assert set(raw) == {"dropout.after", "dropout.shared_rows"}
            assert raw["dropout.after"].shape[0] < 0.05 * sample_embeddings(cache, row)["prompt.0"].shape[0]
    before = (cache / "manifest.parquet").read_bytes()

    _set_keys(config_path, seed=1234, caption_dropout_probability=0.2, learning_rate=3e-4, max_train_steps=7)
    opened = _count_decodes(monkeypatch)
    build_cache(load_config(config_path), device="cpu")  # no --force: reused as it is
    assert opened == [], "nothing changed that is cached, so no image is decoded or encoded again"
    assert (cache / "manifest.parquet").read_bytes() == before


def test_turning_caption_dropout_on_adds_only_dropout_records(demo_project, monkeypatch):
    """Built with caption dropout off, a cache holds no dropout embedding (no language-model pass spent on
    it); training with dropout on refuses it, naming the key and the command; that command then adds only
    the dropout records (no VAE, no shard rewritten), equal to those a build with dropout on writes."""
    config_path = demo_project("edit-v1", n_samples=3)
    _set_keys(config_path, caption_dropout_probability=0.0)  # as SimpleTuner's Qwen edit guide advises
    (cache,) = build_cache(load_config(config_path), device="cpu")
    train_rows = [r for r in manifest_rows(cache) if r["split"] == "train"]
    assert train_rows and all(r[DROPOUT_SHARD] is None for r in train_rows)
    assert not any("dropout" in sample_embeddings(cache, r) for r in train_rows)
    main_shards = {p.name: (p.read_bytes(), p.stat().st_ino) for p in (cache / "shards").glob("*.tar")}
    assert main_shards and not any(name.startswith("dropout-") for name in main_shards)

    _set_keys(config_path, caption_dropout_probability=0.1)
    with pytest.raises(UserError, match=r"caption_dropout_probability.*prep build-cache --config"):
        open_caches(load_config(config_path))

    vae_calls = []
    real = Encoders.encode_pixels
    monkeypatch.setattr(Encoders, "encode_pixels", lambda self, *a: vae_calls.append(1) or real(self, *a))
    build_cache(load_config(config_path), device="cpu")
    assert vae_calls == [], "adding dropout records runs no VAE"
    for name, (data, inode) in main_shards.items():
        path = cache / "shards" / name
        assert path.read_bytes() == data and path.stat().st_ino == inode, f"{name} was rewritten"
    added = [r for r in manifest_rows(cache) if r["split"] == "train"]
    assert all(r[DROPOUT_SHARD].startswith("shards/dropout-") for r in added)
    assert verify_cache(str(cache)).intact
    open_caches(load_config(config_path))  # accepted now
    opened = _count_decodes(monkeypatch)
    build_cache(load_config(config_path), device="cpu")
    assert opened == [], "up to date: nothing decoded"

    # The same embeddings as a build with caption dropout on from the start (bit for bit).
    _set_keys(config_path, caption_dropout_probability=0.1)
    fresh_config = load_config(config_path)
    fresh_dir = cache.parent / "fresh-cache"
    for dataset in fresh_config.main_datasets():
        dataset.cache_dir = str(fresh_dir)
    (fresh,) = build_cache(fresh_config, device="cpu")
    by_id = {r["sample_id"]: r for r in manifest_rows(fresh)}
    for row in added:
        ours, theirs = sample_embeddings(cache, row), sample_embeddings(fresh, by_id[row["sample_id"]])
        assert ours.keys() == theirs.keys() and "dropout" in ours
        for name in ours:
            assert torch.equal(ours[name].view(torch.int16), theirs[name].view(torch.int16)), name


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
    config = load_config(config_path)
    cache_dir = Path(config.cache_location_for(config.main_datasets()[0]))
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


def test_a_dropout_add_stopped_before_its_manifest_is_finished_by_the_rerun(demo_project, monkeypatch):
    """Dropout records sealed, then the build stops before writing the manifest (a kill, a full disk): the rerun
    must write the manifest that lists them, not call the cache up to date."""
    import prep.build

    config_path = demo_project("edit-v1", n_samples=3)
    _set_keys(config_path, caption_dropout_probability=0.0)
    (cache,) = build_cache(load_config(config_path), device="cpu")
    _set_keys(config_path, caption_dropout_probability=0.1)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep.build, "commit", stopped)
    with pytest.raises(KeyboardInterrupt):
        build_cache(load_config(config_path), device="cpu")
    monkeypatch.undo()
    assert any((cache / "shards").glob("dropout-*.tar")), "the dropout records were sealed before the stop"

    build_cache(load_config(config_path), device="cpu")
    assert all(r[DROPOUT_SHARD] for r in manifest_rows(cache) if r["split"] == "train")
    open_caches(load_config(config_path))  # accepted
    assert verify_cache(str(cache)).intact


def _as_written_before_dropout_records(cache) -> None:
    """Rewrite `cache` as this project wrote caches before dropout records had shards of their own: each train
    sample's dropout inside its embeddings member, no dropout columns in the manifest."""
    import shutil

    import pyarrow.parquet as pq

    from shared.cache import CACHE_JSON, DROPOUT_COLUMNS, EMBEDS, LATENTS, MANIFEST, META, Embeddings
    from shared.cache.writer import ShardWriter, commit

    rows = manifest_rows(cache)
    members = {}
    for row in rows:
        dropout = member_bytes(cache, row, DROPOUT) if row[DROPOUT_SHARD] else None
        embeds = Embeddings.from_bytes(member_bytes(cache, row, EMBEDS), dropout).to_bytes()
        members[row["sample_id"]] = {LATENTS: member_bytes(cache, row, LATENTS), EMBEDS: embeds}
        members[row["sample_id"]][META] = member_bytes(cache, row, META)
    info = json.loads((cache / CACHE_JSON).read_text())
    shutil.rmtree(cache / "shards")
    writer = ShardWriter(CacheFolder(cache), info["fingerprint"]["sha256"])
    located = ("record_", "latents_", "embeds_", "json_")  # written anew by the writer
    keep = [c for c in rows[0] if c not in DROPOUT_COLUMNS and not c.startswith(located) and c != "embeds_form"]
    for row in rows:
        writer.write(row["sample_id"], members[row["sample_id"]], {c: row[c] for c in keep if c != "shard"})
    writer.finish_shard()
    commit(CacheFolder(cache), writer.rows, writer.shards, info)
    table = pq.read_table(cache / MANIFEST)
    pq.write_table(
        table.drop_columns(list(DROPOUT_COLUMNS)).replace_schema_metadata(table.schema.metadata), cache / MANIFEST
    )
    info["manifest_sha256"] = hashlib.sha256((cache / MANIFEST).read_bytes()).hexdigest()
    (cache / CACHE_JSON).write_text(json.dumps(info))


def test_a_cache_from_before_dropout_records_trains_and_rebuilds_without_encoding(demo_project, monkeypatch):
    """Caches written before dropout records existed hold the dropout inside each embeddings member: a build
    adds none (nothing to encode), train accepts them with caption dropout on, and reads that dropout."""
    config_path = demo_project("edit-v1", n_samples=3)
    (cache,) = build_cache(load_config(config_path), device="cpu")
    _as_written_before_dropout_records(cache)
    assert verify_cache(str(cache)).intact
    open_caches(load_config(config_path))  # caption dropout on (0.1): accepted

    opened = _count_decodes(monkeypatch)
    _set_keys(config_path, caption_dropout_probability=0.0)
    build_cache(load_config(config_path), device="cpu")
    _set_keys(config_path, caption_dropout_probability=0.1)
    build_cache(load_config(config_path), device="cpu")
    assert opened == [], "the dropout is already cached: nothing is decoded or encoded"
    assert not any((cache / "shards").glob("dropout-*"))
    assert verify_cache(str(cache)).intact
    (train_reader,), _ = open_caches(load_config(config_path))
    for i in range(len(train_reader)):
        embeds = train_reader.load(train_reader.row(i))[1]
        assert embeds.dropout is not None


def test_an_unwritable_cache_dir_or_a_truncated_manifest_is_one_message_not_an_internal_error(demo_project, tmp_path):
    config_path = demo_project("edit-v1", n_samples=2)
    backend_path = tmp_path / "multidatabackend.json"
    backend = json.loads(backend_path.read_text())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    original = backend[0]["cache_dir_vae"]
    backend[0]["cache_dir_vae"] = str(blocker / "cache")  # a folder that cannot be made
    backend_path.write_text(json.dumps(backend))
    result = CliRunner().invoke(app, ["build-cache", "--config", str(config_path)])
    assert result.exit_code == 1 and "internal error" not in result.output, result.output
    assert f"{blocker / 'cache'}: cannot write this cache" in result.output

    backend[0]["cache_dir_vae"] = original
    backend_path.write_text(json.dumps(backend))
    (cache,) = build_cache(load_config(config_path), device="cpu")
    manifest = cache / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[:-300])
    with pytest.raises(UserError, match="manifest.parquet: unreadable .*prep build-cache"):
        open_caches(load_config(config_path))
    build_cache(load_config(config_path), device="cpu")  # repairs it
    assert verify_cache(str(cache)).intact
