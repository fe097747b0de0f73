"""Training on several processes and nodes (torchrun, gloo on CPU), the cache read from S3 (a local S3 server):
two processes on one node end with identical LoRA weights, compared here rank by rank with every memory lever on;
two torchrun agents with `--nnodes 2` (one process each, rendezvous on 127.0.0.1, separate working directories)
end with the same LoRA as that one node. What a two-node job does, on one machine."""

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
from tests.train.conftest import LEVERS, QUICK
from train.checkpoint import list_checkpoints
from train.export import COMFYUI_FILE, LORA_FILE

# 4 samples, 2 processes, micro-batches of 1 accumulated twice: a step is an epoch, so the 3 steps cross two.
# LoRA and caption dropout draw from each rank's generator; with every memory lever on (QUICK: no previews or
# EMA, which nothing here reads), DDP's gradient hooks meet checkpointed, offloaded and swapped blocks.
SETTINGS = {
    "max_train_steps": 3,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 2,
    "checkpointing_steps": 2,
    "eval_holdout": 0,
    "dataloader_num_workers": 0,
    "caption_dropout_probability": 0.3,
    "lora_dropout": 0.1,
    "learning_rate": 1e-3,
    **LEVERS,
    **QUICK,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, module: str = "train.cli") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", module]


def test_two_processes_end_with_identical_weights_and_two_nodes_train_the_same_lora(s3, demo_project, tmp_path):
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

    # One node, two processes, each also saving its own final LoRA tensors (tests/train/ddp_rank_weights.py): the
    # ranks' weights compared here, bit for bit, not only by the run's own check.
    one_node, ranks = tmp_path / "one-node", tmp_path / "ranks"
    ranks.mkdir()
    command = torchrun(
        "--nproc_per_node", "2", "--master_port", str(free_port()), module="tests.train.ddp_rank_weights"
    )
    result = subprocess.run(
        [*command, str(ranks), "run", "--config", str(config_path), "--output-dir", str(one_node)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (load_file(ranks / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert "LoRA weights identical on 2 processes" in result.stdout
    levers = "2/2 blocks checkpointed selectively (attention kept) (inputs offloaded to host), 1 swapped to host"
    assert levers in result.stdout
    final = list_checkpoints(one_node)[-1]
    assert {p.name for p in final.glob("rng-rank*")} == {"rng-rank00.safetensors", "rng-rank01.safetensors"}
    assert (one_node / LORA_FILE).is_file() and (one_node / COMFYUI_FILE).is_file()

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
                [*torchrun(*rendezvous), "run", "--config", str(config_path), "--output-dir", str(two_nodes)],
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
