"""`prep build-cache` into an `s3://` cache (a local S3 server, moto's): the cache a local build writes, byte
for byte; a rerun changes nothing; an interrupted build resumes from its sealed shards; the build lock holds
at a URL as on a local disk."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

import prep.encode_workers
from prep.build import build_cache
from prep.cli import app
from prep.verify import verify_cache
from shared.cache import LOCK, CacheFolder, lock_cache
from shared.cache.lock import ObjectLock, _process_identity
from shared.config import load_config
from shared.errors import UserError
from tests.cache_files import manifest_rows

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

URL = "s3://bucket/cache"


def use_cache(config_path, location: str):
    """The demo project's config with its main dataset's `cache_dir` at `location` (written to its backend file)."""
    backend_path = config_path.parent / "multidatabackend.json"
    backend = json.loads(backend_path.read_text())
    backend[0]["cache_dir"] = location
    backend_path.write_text(json.dumps(backend))
    return load_config(config_path)


def s3_files(s3, prefix: str = "bucket/cache/shards") -> dict[str, bytes]:
    return {path.rsplit("/", 1)[-1]: s3.cat(path) for path in sorted(s3.ls(prefix, refresh=True))}


def test_an_s3_cache_is_the_local_cache_byte_for_byte_and_a_rerun_changes_nothing(s3, demo_project, tmp_path, capsys):
    config_path = demo_project("edit-v2", n_samples=5, train={"caption_dropout_probability": 0.2})
    (local,) = build_cache(use_cache(config_path, str(tmp_path / "local-cache")), device="cpu")
    config = use_cache(config_path, URL)
    (built,) = build_cache(config, device="cpu")
    assert built == URL
    assert manifest_rows(URL) == manifest_rows(local)
    local_shards = {p.name: p.read_bytes() for p in sorted((local / "shards").iterdir())}
    assert s3_files(s3) == local_shards  # every record, member and offset, and the dropout shards
    assert {p.rsplit("/", 1)[-1] for p in s3.ls("bucket/cache", refresh=True)} == {
        "cache.json",
        "manifest.parquet",
        "shards",
        "validation.parquet",
    }, "no lock, index file or temporary left behind"
    assert verify_cache(URL).intact

    capsys.readouterr()
    build_cache(config, device="cpu")
    assert f"cache {URL}: up to date (5 samples)" in capsys.readouterr().out


def test_an_interrupted_s3_build_encodes_only_what_no_sealed_shard_holds(s3, demo_project, monkeypatch, capsys):
    config = use_cache(demo_project("edit-v1", n_samples=6, train={"caption_dropout_probability": 0.0}), URL)
    encoded = []
    real = prep.encode_workers.encode_prepared

    def interrupting(batch, *args, **kwargs):  # a Ctrl-C (or a kill) when the fourth sample comes
        encoded.extend(p.sample.relpath for p in batch)
        if len(encoded) == 4:
            raise KeyboardInterrupt("interrupted")
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(prep.encode_workers, "encode_prepared", interrupting)
    with pytest.raises(KeyboardInterrupt):
        build_cache(config, device="cpu", max_shard_bytes=1)  # a shard per sample: three sealed
    sealed = [name for name in s3_files(s3) if name.endswith(".index.parquet")]
    assert len(sealed) == 3 and not s3.exists(f"{URL}/manifest.parquet")
    assert not s3.exists(f"{URL}/{LOCK}"), "an interrupted build releases its lock"

    encoded.clear()
    capsys.readouterr()
    build_cache(config, device="cpu", max_shard_bytes=1)
    assert f"cache {URL}: 3 up to date, 3 to encode, 0 removed" in capsys.readouterr().out
    assert len(encoded) == 3
    rows = manifest_rows(URL)
    assert len(rows) == len({r["sample_id"] for r in rows}) == 6
    assert sorted(s3_files(s3)) == sorted(r["shard"].removeprefix("shards/") for r in rows), "only live shards"
    assert verify_cache(URL).intact


def test_the_build_lock_holds_at_a_url(s3, demo_project, monkeypatch):
    config_path = demo_project("edit-v1", n_samples=2)
    use_cache(config_path, URL)
    build = ["build-cache", "--config", str(config_path)]
    lock = f"bucket/cache/{LOCK}"

    # A build on another node, renewing its lock: refused, naming it.
    other_node = {"pid": 4242, "host": "node-7", "started": "2026-11-30T08:00", "command": "prep build-cache"}
    s3.pipe(lock, json.dumps(other_node).encode())
    result = CliRunner().invoke(app, build)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "another `prep build-cache` is writing this cache: pid 4242 on node-7" in result.output
    assert not s3.exists(f"{URL}/manifest.parquet")

    # Its lock not renewed for longer than the expiry: that build was killed, and this one continues it.
    with monkeypatch.context() as patch:  # the store's clock an hour on
        patch.setattr(ObjectLock, "_store_now", lambda self: time.time() + 3600)
        result = CliRunner().invoke(app, build)
    assert result.exit_code == 0, result.output
    assert "the build by pid 4242" in result.output and "was stopped; continuing it" in result.output

    # A build of this machine that still runs is refused, however its clock reads; one that ended is taken over.
    this_machine = {"host": socket.gethostname(), "started": "2026-11-30T08:00", "command": "prep"}
    alive = dict(this_machine, pid=os.getpid(), **_process_identity(os.getpid()))
    s3.pipe(lock, json.dumps(alive).encode())
    assert CliRunner().invoke(app, build).exit_code == 1
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = dict(alive, pid=int(gone.stdout))
    s3.pipe(lock, json.dumps(holder).encode())
    result = CliRunner().invoke(app, build)
    assert result.exit_code == 0 and f"the build by pid {holder['pid']}" in result.output, result.output
    assert not s3.exists(lock)

    # Two builds at once: the second cannot create the lock object (S3's conditional write).
    with lock_cache(CacheFolder(URL), LOCK):
        assert s3.exists(lock)
        with pytest.raises(UserError, match="another `prep build-cache` is writing this cache"):
            lock_cache(CacheFolder(URL), LOCK).__enter__()
    assert not s3.exists(lock)


def test_a_build_whose_lock_was_taken_over_stops_and_leaves_the_new_holders_lock(s3, monkeypatch):
    monkeypatch.setattr(ObjectLock, "RENEW_S", 0.05)
    lock = f"bucket/cache/{LOCK}"
    with lock_cache(CacheFolder(URL), LOCK) as mine:
        mine.check()  # held
        s3.pipe(lock, json.dumps({"pid": 7, "host": "node-2"}).encode())  # another build took it over
        deadline = time.monotonic() + 10
        while not mine._lost and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(UserError, match="this build lost its lock"):
            mine.check()  # what the build calls before it writes the manifest
    assert json.loads(s3.cat(lock))["host"] == "node-2", "a release removes only its own lock"

    # Of two builds taking over one stale lock (the same version read), one gets it.
    etag = CacheFolder(URL).version(LOCK)[0]
    assert CacheFolder(URL).replace_if(LOCK, b"{}", etag) == CacheFolder(URL).version(LOCK)[0]
    assert CacheFolder(URL).replace_if(LOCK, b"{}", etag) is None


def test_a_takeover_right_after_a_renewal_is_not_mistaken_for_the_renewal(s3, monkeypatch):
    """The renewal keeps the version its own write made: another build writing between that write and a
    read of the version (here, at once) must not be adopted as this build's lock and overwritten."""
    monkeypatch.setattr(ObjectLock, "RENEW_S", 0.05)
    lock = f"bucket/cache/{LOCK}"
    renew, renewals = CacheFolder.replace_if, []

    def renew_then_taken_over(self, relative, data, etag):
        renewed = renew(self, relative, data, etag)
        if renewed is not None and not renewals:
            s3.pipe(lock, json.dumps({"pid": 7, "host": "node-2"}).encode())  # the race window
        renewals.append(renewed)
        return renewed

    monkeypatch.setattr(CacheFolder, "replace_if", renew_then_taken_over)
    with lock_cache(CacheFolder(URL), LOCK) as mine:
        deadline = time.monotonic() + 10
        while not mine._lost and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(UserError, match="this build lost its lock"):
            mine.check()
    assert renewals[0] is not None and renewals[1] is None  # the next renewal found the other build's version
    assert json.loads(s3.cat(lock))["host"] == "node-2", "the other build's lock stays"


def test_a_shard_never_sealed_never_appears_in_the_bucket(s3):
    import gc

    from shared.cache import MEMBERS
    from shared.cache.writer import ShardWriter

    writer = ShardWriter(CacheFolder(URL), "fp")
    writer.write("a", {m: b"x" * 1000 for m in MEMBERS}, {})  # then the build fails before sealing
    del writer
    gc.collect()  # fsspec closes a file it collects: that must not complete the upload
    assert not s3.exists(f"{URL}/shards/000000.tar")
