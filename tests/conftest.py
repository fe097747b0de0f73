"""Fixtures: the tiny models (written once per session), demo datasets and configs in tmp dirs."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# pytest-xdist runs one worker per core: each worker (and the processes it starts) keeps to its share of cores.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )

from demo.data import write_demo_dataset  # noqa: E402
from demo.tiny_model import write_tiny_model  # noqa: E402
from shared.logs import setup_logging  # noqa: E402


@pytest.fixture(autouse=True)
def logs_on_stdout():
    """Messages reach stdout as they do under the CLIs (which set logging up the same way)."""
    setup_logging()


@pytest.fixture(autouse=True)
def long_lived_objects_frozen():
    """A training run makes full garbage collections (validator.release_memory: after each preview and held-out
    loss, five in a short run; Python makes more on its own), and a full collection walks every object alive:
    ~570k after importing torch, diffusers and transformers, 0.6 s each on this CPU, over a third of a short
    run's time. Frozen (`gc.freeze`), what is alive when a test begins (modules, the session's models, a
    module's cache) is left out of them; what the test itself makes is collected as before. Nothing a test
    computes changes."""
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny model of each flavour. Their vision towers read 28-pixel patches (the real one 14): edit-v1's
    prompt holds its reference at ~1 MP whatever the training size, 1,332 picture tokens at 14, most of every
    edit-v1 transformer step and encode in the tests; at 28, 333. Faithfulness tests compare with diffusers on
    these same models, and the demo's edit-v1 model (tests/demo) keeps 14."""
    root = tmp_path_factory.mktemp("models")
    return {
        flavour: write_tiny_model(root / flavour, flavour, vision_patch=28)
        for flavour in ("edit-v1", "edit-v2", "edit-v3")
    }


def write_config(
    root: Path,
    model: Path,
    flavour: str,
    data: Path,
    n_refs: int,
    train: dict | None = None,
    resolution: int = 256,
    ref_resolution: int | None = None,
    ref_type: str = "reference_strict",
) -> Path:
    """Write config.json + multidatabackend.json for the dataset at `data` (demo layout); return config.json."""
    folders = ["reference"] + [f"reference{i + 1}" for i in range(1, n_refs)]
    backend = [
        {
            "id": "edits",
            "type": "local",
            "instance_data_dir": str(data / "images"),
            "caption_strategy": "textfile",
            "resolution": resolution,
            "conditioning_data": [f"ref{i}" for i in range(n_refs)],
            "cache_dir_vae": str(root / "cache"),
        }
    ] + [
        {
            "id": f"ref{i}",
            "type": "local",
            "dataset_type": "conditioning",
            "instance_data_dir": str(data / folder),
            "conditioning_type": ref_type if i == 0 else "reference_loose",
            "resolution": ref_resolution or resolution,
        }
        for i, folder in enumerate(folders)
    ]
    config = {
        "model_type": "lora",
        "model_family": "qwen_image",
        "model_flavour": flavour,
        "pretrained_model_name_or_path": str(model),
        "data_backend_config": str(root / "multidatabackend.json"),
        "output_dir": str(root / "output"),
        "learning_rate": 1e-3,
        "max_train_steps": 3,
        "lora_rank": 4,
        "lora_alpha": 8,
        "base_model_precision": "int8-quanto",
        "seed": 1,
    }
    if flavour != "edit-v1":  # references at the target's size: the Plus flavours' default ~1 MP references
        # (tests/prep/test_encodings_match_diffusers.py) would make every CPU test of them 10x longer
        config["model_kwargs"] = {"match_target_res": True}
    config.update(train or {})
    (root / "multidatabackend.json").write_text(json.dumps(backend, indent=1))
    (root / "config.json").write_text(json.dumps(config, indent=1))
    return root / "config.json"


@pytest.fixture
def demo_project(tmp_path, tiny_models):
    """A factory: (flavour, **kwargs) -> config.json over a fresh 4-pair demo dataset."""

    def make(flavour: str, n_samples: int = 4, **kwargs) -> Path:
        n_refs = 1 if flavour == "edit-v1" else 2
        if flavour == "edit-v2+":  # 2509 weights trained with zero_cond_t
            data = write_demo_dataset(tmp_path / "data", n_samples=n_samples, n_references=n_refs)
            return write_config(tmp_path, tiny_models["edit-v2"], flavour, data, n_refs, **kwargs)
        data = write_demo_dataset(tmp_path / "data", n_samples=n_samples, n_references=n_refs)
        return write_config(tmp_path, tiny_models[flavour], flavour, data, n_refs, **kwargs)

    return make


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on a free local port (moto's server over HTTP, read with s3fs); every s3:// URL in this
    process, its forks and child processes (through FSSPEC_S3_ENDPOINT_URL) goes there. Yields its filesystem,
    with a bucket named "bucket"."""
    import urllib.request

    import fsspec

    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets in this process across servers: start each test from an empty S3
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,  # what a user sets (or ~/.config/fsspec/s3.json) for a non-AWS endpoint
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("bucket")
    yield fs
    server.stop()
