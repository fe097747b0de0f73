"""A build over 2 processes (torchrun, gloo) equals a 1-process build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch

from prep.build import build_cache
from shared.config import load_config
from tests.cache_files import manifest_rows
from tests.prep.test_build_cache import _content, _tensors, _without_hashes


def test_two_process_build_equals_one_process_build(demo_project, tmp_path):
    config_path = demo_project("edit-v2", n_samples=5)
    config = load_config(config_path)
    (cache,) = build_cache(config, device="cpu", max_shard_bytes=1)
    expected_rows = manifest_rows(cache)
    expected, expected_tensors = _content(expected_rows), _tensors(cache, expected_rows)
    shutil.rmtree(cache)

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
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "5 encoded by 2 process(es)" in result.stdout

    rows = manifest_rows(cache)
    assert _without_hashes(_content(rows)) == _without_hashes(expected)  # same samples, sizes, crops, captions, json
    tensors = _tensors(cache, rows)
    for sample_id, ours in tensors.items():
        for a, b in zip(ours, expected_tensors[sample_id], strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-2)
    shards = {r["shard"] for r in rows}
    assert any(s.startswith("shards/rank00-") for s in shards) and any(s.startswith("shards/rank01-") for s in shards)
