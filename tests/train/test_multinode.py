"""Training across nodes: two torchrun agents with `--nnodes 2` (one process each, rendezvous on 127.0.0.1, separate
working directories), the cache read from S3 (a local S3 server), end with the same LoRA as one node running two
processes. What a two-node job does, on one machine."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from prep.build import build_cache
from shared.config import load_config
from train.export import LORA_FILE

SETTINGS = {
    "max_train_steps": 3,
    "train_batch_size": 1,
    "checkpointing_steps": 2,
    "eval_holdout": 0,
    "dataloader_num_workers": 0,
    "caption_dropout_probability": 0.0,
    "learning_rate": 1e-3,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "train.cli", "run"]


def test_two_nodes_train_the_lora_one_node_with_two_processes_trains(s3, demo_project, tmp_path):
    # 4 samples: 2 batches per process and epoch, so the 3 steps also cross an epoch; what is compared (one
    # node's LoRA against two nodes') does not depend on the count, and every sample is encoded in-process here
    config_path = demo_project("edit-v1", n_samples=4, train=SETTINGS)
    (cache,) = build_cache(load_config(config_path), device="cpu")
    s3.put(f"{cache}/", "bucket/cache", recursive=True)
    shutil.rmtree(cache)  # the nodes read the bucket only
    backend_path = tmp_path / "multidatabackend.json"
    backend = json.loads(backend_path.read_text())
    backend[0]["cache_dir"] = "s3://bucket/cache"
    backend_path.write_text(json.dumps(backend))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")  # carries the S3 endpoint (the fixture)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))

    one_node = tmp_path / "one-node"
    command = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()))
    result = subprocess.run(
        [*command, "--config", str(config_path), "--output-dir", str(one_node)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    two_nodes = tmp_path / "two-nodes"  # output_dir: storage every node sees (here, the same disk)
    port = str(free_port())
    agents = []
    for node in range(2):
        workdir = tmp_path / f"node{node}"
        workdir.mkdir()
        rendezvous = ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1"]
        rendezvous += ["--master_addr", "127.0.0.1", "--master_port", port]
        agents.append(
            subprocess.Popen(
                [*torchrun(*rendezvous), "--config", str(config_path), "--output-dir", str(two_nodes)],
                env=env,
                cwd=workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    for agent, output in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, output[-3000:]
    assert "2 process(es)" in outputs[0] and "LoRA weights identical on 2 processes" in outputs[0]

    ours, want = load_file(two_nodes / LORA_FILE), load_file(one_node / LORA_FILE)
    assert ours.keys() == want.keys() and ours
    assert all(torch.equal(ours[k], want[k]) for k in want), "two nodes trained another LoRA than one node"
    lora_b = [t for k, t in want.items() if "lora_B" in k]
    assert any(t.abs().sum() > 0 for t in lora_b), "the LoRA should have trained"
    checkpoint = two_nodes / "checkpoints" / "checkpoint-000002"
    assert {p.name for p in checkpoint.glob("rng-rank*")} == {"rng-rank00.safetensors", "rng-rank01.safetensors"}
