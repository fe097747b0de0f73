"""`prep build-cache --engine ray`: the local engine's cache, built on Ray Data (a local Ray of 2 CPUs); a driver
killed on a running cluster, resumed by a rerun from its sealed shards."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from prep.build import build_cache
from prep.ray_engine import CallTimes, encoder_report, join_or_start
from prep.verify import verify_cache
from shared.cache import DROPOUT, DROPOUT_SHARD, MEMBERS, member_column
from shared.config import load_config
from shared.errors import UserError
from tests.cache_files import manifest_rows

# Where a record sits (shard, offsets): what a resumed build may place elsewhere than an uninterrupted one.
LOCATION = {
    "shard",
    "record_offset",
    *(member_column(m, k) for m in MEMBERS for k in ("offset", "size")),
    DROPOUT_SHARD,
    member_column(DROPOUT, "offset"),
}


def shard_bytes(cache) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shards/*.tar"))}


@pytest.mark.parametrize("flavour, where", [("edit-v1", "s3"), ("edit-v2", "local")])
def test_ray_builds_the_local_engines_cache_on_disk_or_s3_and_a_rerun_changes_nothing(
    local_ray, demo_project, flavour, where, tmp_path, request, capsys
):
    # 3 samples: the demo's three image sizes, each a bucket of its own, in one actor call as 5 were
    config_path = demo_project(flavour, n_samples=3, train={"caption_dropout_probability": 0.2})
    (local,) = build_cache(load_config(config_path), device="cpu")
    kept = local.with_name("local-engine")
    shutil.move(local, kept)
    if where == "s3":  # the driver writes the shards: the actors need no access to the bucket
        s3 = request.getfixturevalue("s3")
        backend_path = tmp_path / "multidatabackend.json"
        backend = json.loads(backend_path.read_text())
        backend[0]["cache_dir"] = "s3://bucket/cache"
        backend_path.write_text(json.dumps(backend))
    config = load_config(config_path)
    capsys.readouterr()
    (built,) = build_cache(config, device="cpu", engine="ray")
    assert manifest_rows(built) == manifest_rows(kept)
    if where == "s3":
        assert built == "s3://bucket/cache"
        in_bucket = {p.rsplit("/", 1)[-1]: s3.cat(p) for p in sorted(s3.ls("bucket/cache/shards", refresh=True))}
        assert in_bucket == shard_bytes(kept)  # every member, tensor and offset, bit for bit
        assert verify_cache(built).intact
    else:
        assert shard_bytes(built) == shard_bytes(kept)
    assert re.search(r"ray: 1 encoding actor\(s\) busy \d+% of the time", capsys.readouterr().out)
    build_cache(config, device="cpu", engine="ray")
    assert "up to date" in capsys.readouterr().out


def test_the_actors_report_says_how_long_they_waited_for_batches():
    # One actor: 2 s encoding, then its next batch came 1 s late, then 1 s encoding.
    calls = {CallTimes("a", 0.0, 2.0), CallTimes("a", 3.0, 4.0)}
    report = encoder_report(calls)
    assert "1 encoding actor(s) busy 75% of the time (3.0 s of 4.0 s; 2 calls; 1 waited" in report
    assert "1.0 s in all" in report
    # Two actors, each busy throughout its own span: no waiting.
    calls = {CallTimes("a", 0, 1), CallTimes("a", 1, 2), CallTimes("b", 5, 7)}
    assert "2 encoding actor(s) busy 100%" in encoder_report(calls)


def kill_an_encoding_actor(killed: list, stop: threading.Event) -> None:
    """Kill -9 the first encoding actor of this test's Ray (a process this one started) seen alive for 2 s (its
    model loaded, batches on their way): never one of another test's Ray running beside it under xdist."""
    import psutil

    seen: dict[int, float] = {}
    while not stop.is_set() and not killed:
        for process in psutil.Process().children(recursive=True):
            try:
                is_actor = "EncodeActor" in " ".join(process.cmdline())
            except psutil.Error:
                continue
            if is_actor and time.monotonic() - seen.setdefault(process.pid, time.monotonic()) > 2:
                process.kill()
                killed.append(process.pid)
                return
        time.sleep(0.2)


def test_a_killed_encoding_actor_is_replaced_and_the_cache_completes(local_ray, demo_project):
    config = load_config(demo_project("edit-v1", n_samples=8))
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_an_encoding_actor, args=(killed, stop), daemon=True)
    killer.start()
    try:
        (cache,) = build_cache(config, device="cpu", engine="ray")
    finally:
        stop.set()
        killer.join()
    assert killed, "no encoding actor was seen to kill"
    assert len(manifest_rows(cache)) == 8 and verify_cache(str(cache)).intact


def test_without_ray_the_engine_says_what_to_install(demo_project, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    config = load_config(demo_project("edit-v1", n_samples=2))
    with pytest.raises(UserError, match=r"pip install 'qwen-edit-trainer\[ray\]'"):
        build_cache(config, device="cpu", engine="ray")


def closed_port() -> int:
    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("form", ["host:port", "ray://host:port"])
def test_a_ray_address_nothing_answers_at_is_one_message_not_minutes_of_rays_retries(form):
    # Ray's own ray.init retries an unreachable head for minutes, printing only its warnings
    ray = pytest.importorskip("ray")
    port = closed_port()
    address = f"127.0.0.1:{port}" if form == "host:port" else f"ray://127.0.0.1:{port}"
    with pytest.raises(UserError, match=rf"cannot reach the Ray cluster at {re.escape(address)} .*--ray-address"):
        join_or_start(ray, address)
    for malformed in ("head:port", "head", "ray://head"):  # Ray itself refuses a missing port
        with pytest.raises(UserError, match=rf"'{malformed}' is not host:port"):
            join_or_start(ray, malformed)
    with pytest.raises(UserError, match=r"is a dashboard's: .* host:6379"):
        join_or_start(ray, f"http://127.0.0.1:{port}")


def test_auto_checks_the_cluster_ray_address_names(monkeypatch):
    ray = pytest.importorskip("ray")
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)  # what Ray joins for auto
    with pytest.raises(UserError, match=rf"cannot reach the Ray cluster at {re.escape(address)} "):
        join_or_start(ray, "auto")


def content(rows: list[dict]) -> dict[str, dict]:
    """Sample id -> its manifest row without where it sits: sizes and sha256 of every member stay (bit-for-bit
    tensors), as tests/prep/test_build_cache.py compares a resumed build with an uninterrupted one."""
    return {r["sample_id"]: {k: v for k, v in r.items() if k not in LOCATION} for r in rows}


def ray_build_command(config_path: Path) -> list[str]:
    """`prep build-cache --config CONFIG --device cpu --engine ray` in a fresh Python, with shards of one record
    each: the command line has no shard-size flag, so `prep.build.build_cache` is given max_shard_bytes=1 first."""
    script = (
        "import functools, prep.build; "
        "prep.build.build_cache = functools.partial(prep.build.build_cache, max_shard_bytes=1); "
        "from prep.cli import app; app()"
    )
    args = ["build-cache", "--config", str(config_path), "--device", "cpu", "--engine", "ray"]
    return [sys.executable, "-c", script, *args]


def sealed_samples(cache: Path) -> int:
    """Samples in the main shards sealed so far (their index written): what a rerun must reuse."""
    return sum(pq.read_metadata(p).num_rows for p in (cache / "shards").glob("[0-9]*.index.parquet"))


def kill_with_its_ray(driver: subprocess.Popen) -> None:
    """SIGKILL the driver, then every process it started (its local Ray): Ray's dashboard and runtime-env agents
    outlive a driver killed -9, and nothing a test starts may stay behind."""
    import psutil

    if driver.poll() is not None:
        return
    family = psutil.Process(driver.pid).children(recursive=True)
    driver.kill()
    driver.wait()
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(family, timeout=30)


def kill_once_sealed(driver: subprocess.Popen, cache: Path, at_least: int) -> None:
    """Kill the driver (and its Ray) once `at_least` samples are sealed in `cache`, or after 300 s."""
    try:
        deadline = time.monotonic() + 300
        while driver.poll() is None and time.monotonic() < deadline and sealed_samples(cache) < at_least:
            time.sleep(0.05)
    finally:
        kill_with_its_ray(driver)


def test_a_driver_killed_mid_build_on_a_cluster_is_resumed_by_a_rerun_from_its_sealed_shards(
    local_ray, demo_project, tmp_path
):
    # Three actor calls of 8 samples (on CPU), encoded one after another: the driver is killed once the first
    # call's records are sealed, while the others still encode. (Not two: the actor builds a call's records
    # while the next call encodes, and on a busy host the first call's records reached the driver together
    # with the second's, leaving no build to kill.)
    import ray

    n = 24
    config_path = demo_project("edit-v1", n_samples=n)
    config = load_config(config_path)
    cache = Path(config.cache_location_for(config.main_datasets()[0]))

    # The killed driver joins a running cluster (this session's Ray, by its address), as a job on a cluster's
    # head node does; the rerun, the same build command without --ray-address, starts a Ray of its own, as on a
    # workstation: what a rerun resumes is in the cache, not in the cluster.
    command = ray_build_command(config_path)
    joining = [*command, "--ray-address", ray.get_runtime_context().gcs_address]
    with open(tmp_path / "killed.log", "w") as log:
        driver = subprocess.Popen(joining, stdout=log, stderr=subprocess.STDOUT)
        killer = threading.Thread(target=kill_once_sealed, args=(driver, cache, 2))
        killer.start()
        try:
            # The local engine's uninterrupted cache, built meanwhile (the driver spends its first ~15-30 s starting
            # Python and its actor) into a folder of its own: where a cache sits is not in its rows.
            for dataset in config.main_datasets():
                dataset.cache_dir = str(tmp_path / "uninterrupted")
            (uninterrupted,) = build_cache(config, device="cpu")
            expected = content(manifest_rows(uninterrupted))
        finally:
            killer.join()
    killed_log = (tmp_path / "killed.log").read_text()[-3000:]
    assert driver.returncode == -signal.SIGKILL, f"the build ended before it was killed:\n{killed_log}"
    sealed = sealed_samples(cache)
    assert 2 <= sealed < n and not (cache / "manifest.parquet").exists(), killed_log

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "was stopped; continuing it" in rerun.stdout  # the killed driver's lock, named
    summary = re.search(r"(\d+) samples \((\d+) encoded by 1 process\(es\), (\d+) reused", rerun.stdout)
    assert summary, rerun.stdout
    assert [int(x) for x in summary.groups()] == [n, n - sealed, sealed], "only the samples no sealed shard holds"
    rows = manifest_rows(cache)
    assert sorted(r["sample_id"] for r in rows) == sorted(expected), "every sample once"
    assert content(rows) == expected
    result = verify_cache(str(cache))
    assert result.intact and not result.notes, result.problems + result.notes  # the killed shard in progress: gone
