"""`prep build-cache --engine ray`: the local engine's cache, built on Ray Data (a local Ray of 2 CPUs)."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from prep.build import build_cache
from shared.config import load_config
from tests.cache_files import manifest_rows


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def shard_bytes(cache) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shards/*.tar"))}


@pytest.mark.parametrize("flavour", ["edit-v1", "edit-v2"])
def test_ray_builds_the_local_engines_cache_and_a_rerun_changes_nothing(local_ray, demo_project, flavour, capsys):
    config_path = demo_project(flavour, n_samples=5, train={"caption_dropout_probability": 0.2})
    config = load_config(config_path)
    (local,) = build_cache(config, device="cpu")
    kept = local.with_name("local-engine")
    shutil.move(local, kept)
    (built,) = build_cache(config, device="cpu", engine="ray")
    assert manifest_rows(built) == manifest_rows(kept)
    assert shard_bytes(built) == shard_bytes(kept)  # every member, tensor and offset, bit for bit
    capsys.readouterr()
    build_cache(config, device="cpu", engine="ray")
    assert "up to date" in capsys.readouterr().out


def kill_an_encoding_actor(killed: list, stop: threading.Event) -> None:
    """Kill -9 the first encoding actor seen alive for 2 s (its model loaded, batches on their way)."""
    import psutil

    seen: dict[int, float] = {}
    while not stop.is_set() and not killed:
        for process in psutil.process_iter(["pid", "cmdline"]):
            if "EncodeActor" in " ".join(process.info["cmdline"] or []):
                first = seen.setdefault(process.info["pid"], time.monotonic())
                if time.monotonic() - first > 2:
                    process.kill()
                    killed.append(process.info["pid"])
                    return
        time.sleep(0.2)


def test_a_killed_encoding_actor_is_replaced_and_the_cache_completes(local_ray, demo_project):
    from prep.verify import verify_cache

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

    from shared.errors import UserError

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    config = load_config(demo_project("edit-v1", n_samples=2))
    with pytest.raises(UserError, match=r"pip install 'qwen-edit-trainer\[ray\]'"):
        build_cache(config, device="cpu", engine="ray")
