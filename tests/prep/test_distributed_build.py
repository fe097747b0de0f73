"""A build over 2 processes (torchrun, gloo) equals a 1-process build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from prep.build import build_cache
from shared.config import load_config
from tests.cache_files import manifest_rows
from tests.prep.test_build_cache import _content, _tensors, _without_hashes


def test_two_process_build_equals_one_process_build(demo_project, tmp_path):
    # 3 samples: one of each of the demo's three image sizes; rank 0 encodes two of them, rank 1 one.
    config_path = demo_project("edit-v2", n_samples=3)
    config = load_config(config_path)
    cache = Path(config.cache_location_for(config.main_datasets()[0]))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "prep.cli",
        "build-cache",
        "--config",
        str(config_path),
        "--device",
        "cpu",
    ]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as torchrun:
        # The 1-process build, meanwhile (torchrun's two processes spend their first seconds importing), into a
        # folder of its own: where a cache sits is not in its rows or tensors.
        for dataset in config.main_datasets():
            dataset.cache_dir = str(tmp_path / "one-process")
        (one_process,) = build_cache(config, device="cpu", max_shard_bytes=1)
        expected_rows = manifest_rows(one_process)
        expected, expected_tensors = _content(expected_rows), _tensors(one_process, expected_rows)
        stdout, stderr = torchrun.communicate(timeout=300)
    assert torchrun.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "3 encoded by 2 process(es)" in stdout

    rows = manifest_rows(cache)
    assert _without_hashes(_content(rows)) == _without_hashes(expected)  # same samples, sizes, crops, captions, json
    tensors = _tensors(cache, rows)
    for sample_id, ours in tensors.items():
        for a, b in zip(ours, expected_tensors[sample_id], strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-2)
    shards = {r["shard"] for r in rows}
    assert any(s.startswith("shards/rank00-") for s in shards) and any(s.startswith("shards/rank01-") for s in shards)
