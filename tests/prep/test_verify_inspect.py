"""prep verify catches corrupt and missing shards; prep inspect describes a cache."""

from __future__ import annotations

from typer.testing import CliRunner

from demo.data import write_demo_dataset
from prep.build import build_cache
from prep.cli import app
from shared.cache import member_column
from shared.config import load_config
from tests.cache_files import manifest_rows


def _verify(cache, *flags):
    result = CliRunner().invoke(app, ["verify", str(cache), *flags])
    assert "Traceback" not in result.output
    return result


def test_verify_catches_any_changed_missing_or_extra_byte_and_names_the_sample(demo_project):
    (cache,) = build_cache(load_config(demo_project("edit-v1", n_samples=3)), device="cpu")  # one shard + dropout
    ok = _verify(cache)
    assert ok.exit_code == 0 and "3 samples in 2 shards" in ok.output and "intact" in ok.output

    rows = manifest_rows(cache)
    shard = cache / rows[0]["shard"]
    original = shard.read_bytes()
    victim = rows[1]
    latents, meta = (victim[member_column(m, "offset")] for m in ("latents.safetensors", "json"))
    padding = meta + victim[member_column("json", "size")]
    assert padding % 512, "the json member of this record ends inside a block, so it has padding"
    last_record_end = max(r["record_offset"] + r["record_size"] for r in rows)
    places = {
        "tar header": latents - 512 + 100,  # the mode field of the latents member's header
        "data": latents + 300,
        "padding": padding,
        "end of archive": last_record_end + 10,
    }
    for where, offset in places.items():
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        shard.write_bytes(bytes(damaged))
        result = _verify(cache)
        assert result.exit_code == 1, where
        assert "sha256 differs" in result.output, where
        if where == "end of archive":
            assert "outside every record" in result.output
        else:
            assert f"{victim['sample_id']} ({victim['relpath']})" in result.output, where
            assert rows[0]["sample_id"] not in result.output and rows[2]["sample_id"] not in result.output, where
        if where == "data":
            assert "latents.safetensors" in result.output
        assert _verify(cache, "--quick").exit_code == 0, "--quick checks sizes only"

    shard.write_bytes(original + b"\0" * 512)
    result = _verify(cache, "--quick")
    assert result.exit_code == 1 and "512 extra bytes" in result.output

    shard.write_bytes(original[: rows[2]["record_offset"] + 700])
    result = _verify(cache)
    assert result.exit_code == 1 and "truncated" in result.output
    assert f"samples past the end: {rows[2]['sample_id']}" in result.output

    shard.unlink()
    result = _verify(cache)
    assert result.exit_code == 1 and f"{shard}: missing (3 samples" in result.output

    shard.write_bytes(original)
    assert _verify(cache).exit_code == 0


def test_verify_refuses_a_manifest_that_points_outside_the_cache(demo_project, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (cache,) = build_cache(load_config(demo_project("edit-v1", n_samples=2)), device="cpu")
    table = pq.read_table(cache / "manifest.parquet")
    crafted = table.set_column(
        table.schema.get_field_index("shard"), "shard", pa.array(["../../../../etc/passwd"] * table.num_rows)
    )
    pq.write_table(crafted, cache / "manifest.parquet")
    result = _verify(cache)
    assert result.exit_code == 1
    assert "'../../../../etc/passwd', which is not a shard of this cache" in result.output


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
        "embeddings stored: whole 3",  # one caption each; the dropout, sharing its first rows, has its own record
        "dropout embeddings: 3 of 3 train samples",
    ):
        assert text in result.output, text


def test_a_manifest_from_before_the_embeds_form_column_reads_and_updates(demo_project, tmp_path):
    """Caches written before `embeds_form` existed: their rows are kept (the column reads null), new samples
    get it, and inspect says the form was not recorded."""
    import hashlib
    import json

    import pyarrow.parquet as pq

    path = demo_project("edit-v1", n_samples=3)
    config = load_config(path)
    (cache,) = build_cache(config, device="cpu")
    old = pq.read_table(cache / "manifest.parquet")
    pq.write_table(
        old.drop_columns(["embeds_form"]).replace_schema_metadata(old.schema.metadata), cache / "manifest.parquet"
    )
    info = json.loads((cache / "cache.json").read_text())
    info["manifest_sha256"] = hashlib.sha256((cache / "manifest.parquet").read_bytes()).hexdigest()
    (cache / "cache.json").write_text(json.dumps(info))
    assert "form not recorded 3" in CliRunner().invoke(app, ["inspect", str(cache)]).output

    write_demo_dataset(tmp_path / "data", n_samples=4, n_references=1)  # the same three pairs, and a fourth
    build_cache(load_config(path), device="cpu")
    forms = [r["embeds_form"] for r in manifest_rows(cache)]
    assert len(forms) == 4 and None in forms and "whole" in forms  # kept rows, and the new one
    assert _verify(cache).exit_code == 0


def _repair_and_check(cache, config, expected_ids):
    build_cache(config, device="cpu", max_shard_bytes=1)
    assert _verify(cache).exit_code == 0, _verify(cache).output
    assert {r["sample_id"] for r in manifest_rows(cache)} == expected_ids
    assert not (cache / "damaged.json").exists()


def test_what_verify_finds_build_cache_repairs_a_flipped_byte_swapped_shards_a_changed_manifest(demo_project):
    import pyarrow.parquet as pq

    config = load_config(demo_project("edit-v1", n_samples=4))
    (cache,) = build_cache(config, device="cpu", max_shard_bytes=1)  # one shard per sample
    rows = manifest_rows(cache)
    ids = {r["sample_id"] for r in rows}

    # a flipped byte inside a record's data: same size, so only verify's hashes see it
    shard = cache / rows[0]["shard"]
    data = bytearray(shard.read_bytes())
    data[rows[0][member_column("latents.safetensors", "offset")] + 200] ^= 0x01
    shard.write_bytes(bytes(data))
    found = _verify(cache)
    assert found.exit_code == 1 and rows[0]["shard"] in found.output
    _repair_and_check(cache, config, ids)

    # two shards of the same size swapped
    rows = manifest_rows(cache)
    same = {}
    for row in rows:
        same.setdefault((cache / row["shard"]).stat().st_size, []).append(cache / row["shard"])
    a, b = next(paths for paths in same.values() if len(paths) > 1)[:2]
    first, second = a.read_bytes(), b.read_bytes()
    a.write_bytes(second)
    b.write_bytes(first)
    assert _verify(cache).exit_code == 1
    _repair_and_check(cache, config, ids)

    # one changed value in the manifest (a prompt length), written back as valid Parquet
    table = pq.read_table(cache / "manifest.parquet")
    lens = table.column("prompt_lens").to_pylist()
    lens[0] = [lens[0][0] + 1]
    table = table.set_column(table.schema.get_field_index("prompt_lens"), "prompt_lens", [lens])
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), cache / "manifest.parquet")
    found = _verify(cache)
    assert found.exit_code == 1 and "differs from the manifest the build wrote" in found.output
    _repair_and_check(cache, config, ids)


def test_a_damaged_dropout_record_is_named_and_only_it_is_encoded_again(demo_project, monkeypatch):
    from prep.encode import Encoders

    config = load_config(demo_project("edit-v1", n_samples=3))
    (cache,) = build_cache(config, device="cpu")
    rows = manifest_rows(cache)
    victim = next(r for r in rows if r["split"] == "train")
    shard = cache / victim["dropout_shard"]
    data = bytearray(shard.read_bytes())
    data[victim[member_column("dropout.safetensors", "offset")] + 40] ^= 0x01
    shard.write_bytes(bytes(data))
    found = _verify(cache)
    assert found.exit_code == 1 and victim["dropout_shard"] in found.output
    assert f"{victim['sample_id']} ({victim['relpath']}): dropout.safetensors" in found.output

    vae_calls = []
    real = Encoders.encode_pixels
    monkeypatch.setattr(Encoders, "encode_pixels", lambda self, *a: vae_calls.append(1) or real(self, *a))
    main_shards = {r["shard"]: (cache / r["shard"]).read_bytes() for r in rows}
    build_cache(config, device="cpu")
    assert vae_calls == [], "only dropout records are encoded again"
    assert all((cache / name).read_bytes() == data for name, data in main_shards.items())
    assert _verify(cache).exit_code == 0


def test_records_of_removed_samples_in_a_shard_still_used_are_a_note_not_damage(demo_project, tmp_path):
    config_path = demo_project("edit-v1", n_samples=3)
    (cache,) = build_cache(load_config(config_path), device="cpu")  # one shard holds all three
    gone = manifest_rows(cache)[1]["relpath"]
    for folder in ("images", "reference"):
        (tmp_path / "data" / folder / gone).unlink()
    (tmp_path / "data" / "images" / gone).with_suffix(".txt").unlink()
    build_cache(load_config(config_path), device="cpu")
    assert len(manifest_rows(cache)) == 2
    result = _verify(cache)
    assert result.exit_code == 0, result.output
    assert "records no sample uses any more" in result.output


def test_verify_of_a_changed_or_truncated_manifest_exits_1_with_one_message(demo_project):
    import subprocess
    import sys

    import pyarrow.parquet as pq

    (cache,) = build_cache(load_config(demo_project("edit-v1", n_samples=3)), device="cpu")
    manifest = cache / "manifest.parquet"
    table = pq.read_table(manifest)
    lens = table.column("prompt_lens").to_pylist()
    lens[0] = [lens[0][0] + 1]
    table = table.set_column(table.schema.get_field_index("prompt_lens"), "prompt_lens", [lens])
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), manifest)
    command = [sys.executable, "-m", "prep.cli", "verify", str(cache)]
    # It used to die at exit now and then ("terminate called without an active exception"): Arrow's pools let go of
    # the manifest's file as the interpreter exited. tests/shared/test_parquet.py checks that no read leaves them work.
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "differs from the manifest the build wrote" in result.stdout + result.stderr
    assert "terminate called" not in result.stderr and "Traceback" not in result.stderr

    manifest.write_bytes(manifest.read_bytes()[:-200])  # cut short
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert f"{manifest}: unreadable" in result.stdout + result.stderr
