"""prep build-cache: the manifest locates every member, and bad pairing stops before any model loads."""

from __future__ import annotations

import hashlib
import json
import tarfile

import pytest
from typer.testing import CliRunner

import prep.encode
from prep.build import build_cache
from prep.cli import app
from shared.cache_format import MEMBERS, member_column, read_manifest, read_member
from shared.config import load_config


def test_manifest_offsets_and_hashes_locate_each_member(demo_project):
    config = load_config(demo_project("edit-v1", n_samples=3))
    (cache,) = build_cache(config, device="cpu")
    rows = read_manifest(cache)
    assert len({r["sample_id"] for r in rows}) == 3
    for row in rows:
        assert "." not in row["sample_id"]
        with tarfile.open(cache / row["shard"]) as tar:
            for member in MEMBERS:
                data = read_member(cache, row, member)
                assert data == tar.extractfile(f"{row['sample_id']}.{member}").read()
                assert hashlib.sha256(data).hexdigest() == row[member_column(member, "sha256")]
        meta = json.loads(read_member(cache, row, "json"))
        assert meta["relpath"] == row["relpath"] and meta["captions"] == row["captions"]
        assert [row["width"], row["height"]] == meta["target"]["size"]
    assert not list(cache.parent.glob("*.building")), "the staging dir was left behind"


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


@pytest.mark.parametrize("flavour", ["edit-v1"])
def test_rebuild_keeps_old_cache_until_the_new_one_is_complete(flavour, demo_project, monkeypatch):
    config = load_config(demo_project(flavour, n_samples=2))
    (cache,) = build_cache(config, device="cpu")
    before = read_manifest(cache)

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr("prep.build.encode_sample", crash)
    with pytest.raises(RuntimeError):
        build_cache(config, device="cpu")
    assert read_manifest(cache) == before
