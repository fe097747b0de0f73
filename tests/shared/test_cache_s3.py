"""The cache over S3, against a real S3 endpoint started here (moto's server over HTTP, through s3fs): `prep
build-cache` writes it to the bucket, `prep verify` checks it, `train run` trains two steps from it with the
images gone, and a flipped byte is caught."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from prep.cli import app
from shared.config import load_config
from tests.cache_files import manifest_rows
from train.loop import train

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


def test_build_verify_and_train_on_s3_and_catch_a_flipped_byte(s3, demo_project, tmp_path):
    config_path = demo_project("edit-v1", n_samples=4, train={"max_train_steps": 2, "dataloader_num_workers": 2})
    url = "s3://bucket/cache"
    backend_path = tmp_path / "multidatabackend.json"
    backend = json.loads(backend_path.read_text())
    backend[0]["cache_dir"] = url
    backend_path.write_text(json.dumps(backend))
    built = CliRunner().invoke(app, ["build-cache", "--config", str(config_path), "--device", "cpu"])
    assert built.exit_code == 0 and f"cache {url}: 4 samples" in built.output, built.output
    rows = manifest_rows(url)
    assert s3.exists("bucket/cache/manifest.parquet") and s3.exists(f"bucket/cache/{rows[0]['shard']}")

    ok = CliRunner().invoke(app, ["verify", url])
    assert ok.exit_code == 0 and "intact" in ok.output, ok.output

    # Train from the bucket alone: the raw images are gone.
    shutil.rmtree(tmp_path / "data")
    lora = train(load_config(config_path))
    assert lora.is_file()
    steps = [line.split(",")[0] for line in (lora.parent / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2"], "two optimizer steps, read from S3"

    victim = rows[2]
    key = f"bucket/cache/{victim['shard']}"
    data = bytearray(s3.cat(key))
    data[victim["embeds_offset"] + 50] ^= 0x10
    s3.pipe(key, bytes(data))
    bad = CliRunner().invoke(app, ["verify", url])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert f"{victim['sample_id']} ({victim['relpath']}): embeds.safetensors" in bad.output
