"""prep verify catches corrupt and missing shards; prep inspect describes a cache."""

from __future__ import annotations

from typer.testing import CliRunner

from prep.build import build_cache
from prep.cli import app
from shared.cache_format import member_column, read_manifest
from shared.config import load_config


def test_verify_passes_an_intact_cache_and_catches_a_flipped_byte_and_a_missing_shard(demo_project):
    (cache,) = build_cache(load_config(demo_project("edit-v1", n_samples=3)), device="cpu", max_shard_bytes=1)
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(cache)])
    assert ok.exit_code == 0 and "9 members checked: intact" in ok.output

    rows = read_manifest(cache)
    victim = rows[1]
    shard = cache / victim["shard"]
    data = bytearray(shard.read_bytes())
    data[victim[member_column("embeds.safetensors", "offset")] + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    (cache / rows[2]["shard"]).unlink()

    bad = runner.invoke(app, ["verify", str(cache)])
    assert bad.exit_code == 1
    assert (
        f"sample {victim['sample_id']} ({victim['relpath']}) member embeds.safetensors: sha256 mismatch" in bad.output
    )
    assert f"{cache / rows[2]['shard']}: missing shard (1 samples)" in bad.output
    assert "Traceback" not in bad.output


def test_inspect_prints_counts_buckets_tokens_bytes_and_fingerprint(demo_project):
    (cache,) = build_cache(load_config(demo_project("edit-v2", n_samples=3)), device="cpu")
    result = CliRunner().invoke(app, ["inspect", str(cache)])
    assert result.exit_code == 0, result.output
    for text in (
        "samples: 3 (train 3, eval 0)",
        "KiB/sample",
        "fingerprint:",
        "256x256: 1",
        "288x224: 1",
        "VL embedding length (tokens)",
    ):
        assert text in result.output, text
