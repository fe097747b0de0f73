"""Buckets and crops recorded per sample, caption tables, several main datasets and the eval split."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prep.buckets import bucket_size, place, plan_placement
from prep.build import build_cache
from prep.scan import scan_dataset
from shared.config import DatasetConfig, load_config
from shared.errors import UserError
from tests.cache_files import manifest_rows, member_bytes, sample_embeddings, stored_tensors
from train.caches import open_caches
from train.evaluation.eval_set import EvalSet

ASPECTS = [(1024, 1024), (1280, 720), (720, 1280), (1600, 900), (500, 1500), (333, 777), (4000, 1000)]


@pytest.mark.parametrize("crop_style", ["center", "random"])
@pytest.mark.parametrize("crop_aspect", ["preserve", "square"])
def test_strict_reference_gets_the_targets_exact_crop_in_every_bucket(crop_style, crop_aspect):
    dataset = DatasetConfig(id="d", resolution=512, crop=True, crop_style=crop_style, crop_aspect=crop_aspect)
    for width, height in ASPECTS:
        placement = plan_placement(width, height, dataset, seed=3, sample_id="abc")
        bw, bh = placement.size
        assert bw % 32 == 0 and bh % 32 == 0 and (bw == bh) == (crop_aspect == "square" or bw == bh)
        assert placement.size == bucket_size(width, height, 512, "pixel_area", crop_aspect == "square")
        target = Image.new("RGB", (width, height), "red")
        reference = Image.new("RGB", (width // 2, height // 2), "blue")  # same aspect, other resolution
        assert placement.apply(target).size == placement.apply(reference).size == placement.size
        assert plan_placement(width, height, dataset, seed=3, sample_id="abc") == placement  # seeded


def test_random_crops_move_and_centre_crops_do_not():
    boxes = {place(2000, 1000, (512, 512), random_crop=True, seed=str(i)).box for i in range(10)}
    assert len(boxes) > 1
    assert place(2000, 1000, (512, 512)).box == (256, 0, 768, 512)


def _edit_backend(path, update):
    backend = json.loads(path.read_text())
    backend[0].update(update)
    path.write_text(json.dumps(backend))


def test_cache_records_sizes_and_crop_boxes(demo_project, tmp_path):
    config_path = demo_project("edit-v2", n_samples=3)
    _edit_backend(tmp_path / "multidatabackend.json", {"crop": True, "crop_style": "random"})
    (cache,) = build_cache(load_config(config_path), device="cpu")
    for row in manifest_rows(cache):
        meta = json.loads(member_bytes(cache, row, "json"))
        target, (strict, loose) = meta["target"], meta["references"]
        assert target["size"] == [row["width"], row["height"]]
        assert target["crop_box"] == row["crop_box"] == strict["crop_box"] == row["ref_crop_boxes"][0]
        assert strict["scaled_size"] == target["scaled_size"]
        assert loose["crop_box"] is None and row["ref_crop_boxes"][1] == []
        assert row["original_size"] == target["original_size"]
        assert target["crop_style"] == "random" and target["crop_seed"].endswith(f"{row['sample_id']}:edits")


def _captionless_dataset(root, names):
    for folder in ("images", "reference"):
        (root / folder).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (64, 64), "white").save(root / folder / name)


@pytest.mark.parametrize("table", ["captions.parquet", "captions.jsonl"])
def test_captions_from_a_table(tmp_path, table):
    _captionless_dataset(tmp_path, ["a.png", "b.png", "c.png"])
    # Keyed by relative path or by stem; one caption or several per image.
    rows = [{"file": "a.png", "text": ["make it red"]}, {"file": "b", "text": ["add a hat", "a hat, please"]}]
    path = tmp_path / table
    if table.endswith(".jsonl"):
        rows[0]["text"] = "make it red"  # JSONL may hold a plain string
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    backend = [
        {
            "id": "e",
            "instance_data_dir": str(tmp_path / "images"),
            "caption_strategy": "parquet",
            "parquet": {"path": str(path), "filename_column": "file", "caption_column": "text"},
            "conditioning_data": ["r"],
        },
        {"id": "r", "dataset_type": "conditioning", "instance_data_dir": str(tmp_path / "reference")},
    ]
    (tmp_path / "db.json").write_text(json.dumps(backend))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": str(tmp_path / "db.json")}))
    config = load_config(tmp_path / "config.json")
    scan = scan_dataset(config, config.main_datasets()[0])
    captions = {s.relpath: s.captions for s in scan.samples}
    assert captions == {"a.png": ["make it red"], "b.png": ["add a hat", "a hat, please"]}
    (missing,) = scan.findings
    assert missing.kind == "missing caption" and missing.path.endswith("c.png") and table in missing.message


def test_several_main_datasets_and_an_eval_split(demo_project, tmp_path, tiny_models):
    config_path = demo_project("edit-v1", n_samples=2)
    backend = json.loads((tmp_path / "multidatabackend.json").read_text())
    held_out = dict(backend[0], id="held-out", conditioning_data=["ref0"], cache_dir_vae=str(tmp_path / "cache-eval"))
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backend + [held_out]))
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, eval_dataset_id="held-out")))

    cfg = load_config(config_path)
    train_cache, eval_cache = build_cache(cfg, device="cpu")
    assert {r["split"] for r in manifest_rows(train_cache)} == {"train"}
    eval_rows = manifest_rows(eval_cache)
    assert {r["split"] for r in eval_rows} == {"eval"}
    embeds = stored_tensors(member_bytes(eval_cache, eval_rows[0], "embeds.safetensors"))
    assert "negative" in embeds and "prompt.0" in embeds
    train_readers, eval_readers = open_caches(cfg)
    assert [r.location for r in train_readers] == [str(train_cache)]
    assert len(EvalSet(eval_readers)) == 2  # the whole eval dataset


def test_held_out_samples_are_cached_for_previews(demo_project, tmp_path, capsys):
    """Without an eval dataset, the samples with the smallest ids are held out, cached at the preview resolution
    with the negative instruction; changing a preview setting re-encodes those samples only."""
    keys = {"eval_holdout": 2, "validation_resolution": 128, "validation_negative_prompt": "blurry"}
    config_path = demo_project("edit-v1", n_samples=8, train=keys)
    (cache,) = build_cache(load_config(config_path), device="cpu")
    rows = manifest_rows(cache)
    held = sorted(r["sample_id"] for r in rows)[:2]
    assert sorted(r["sample_id"] for r in rows if r["split"] == "eval") == held
    for row in rows:
        pixels = row["height"] * row["width"]
        assert (pixels <= 160 * 160) == (row["split"] == "eval")  # eval at ~128², train at ~256²
        embeds = sample_embeddings(cache, row)
        assert ("negative" in embeds) == (row["split"] == "eval") == ("dropout" not in embeds)
    train_readers, eval_readers = open_caches(load_config(config_path))
    assert len(train_readers[0]) == 6 and len(EvalSet(eval_readers)) == 2

    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, validation_negative_prompt="ugly")))
    with pytest.raises(UserError, match="eval samples only"):
        open_caches(load_config(config_path))  # train says what to do
    capsys.readouterr()
    build_cache(load_config(config_path), device="cpu")
    assert "6 up to date, 2 to encode" in capsys.readouterr().out
    assert open_caches(load_config(config_path))


def test_crop_aspect_means_nothing_without_crop():
    """As in SimpleTuner: with crop false the image keeps its aspect whatever crop_aspect says; crop true
    with SimpleTuner's defaults (random, square) crops a square at a seeded random offset."""
    uncropped = DatasetConfig(id="d", resolution=512, crop=False, crop_aspect="square", crop_style="random")
    placement = plan_placement(1600, 900, uncropped, seed=0, sample_id="a")
    assert placement.size == bucket_size(1600, 900, 512, "pixel_area") and placement.size[0] != placement.size[1]
    cropped = DatasetConfig(id="d", resolution=512, crop=True)
    boxes = {plan_placement(1600, 900, cropped, seed=0, sample_id=str(i)).box for i in range(8)}
    assert all(b[2] - b[0] == b[3] - b[1] for b in boxes) and len(boxes) > 1
