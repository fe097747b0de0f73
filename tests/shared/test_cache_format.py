"""The cache contract's own rules: typed records keep their stored names, old formats and foreign paths are refused."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load as load_safetensors

from shared.cache import CacheFolder, CacheStore, Embeddings, Latents, check_shard_path
from shared.cache.format import EMBEDS_SHARED_PREFIX, EMBEDS_WHOLE
from shared.errors import UserError


def test_records_round_trip_under_the_documented_tensor_names():
    target, refs = torch.randn(16, 4, 6), [torch.randn(16, 4, 6), torch.randn(16, 2, 2)]
    latents = Latents.from_bytes(Latents(target, refs).to_bytes())
    assert set(load_safetensors(Latents(target, refs).to_bytes())) == {"target", "ref.0", "ref.1"}
    assert torch.equal(latents.target, target.bfloat16()) and [r.shape for r in latents.references] == [
        (16, 4, 6),
        (16, 2, 2),
    ]

    prompts, dropout = [torch.randn(5, 8), torch.randn(7, 8)], torch.randn(3, 8)
    data = Embeddings(prompts, dropout=dropout).to_bytes()
    assert set(load_safetensors(data)) == {"prompt.0", "prompt.1", "dropout"}
    embeds = Embeddings.from_bytes(data)
    assert [p.shape[0] for p in embeds.prompts] == [5, 7] and embeds.negative is None
    assert torch.equal(embeds.dropout, dropout.bfloat16())

    # conditioning_multidataset_sampling random: per reference, its own prompts and dropout
    alone = [Embeddings([torch.randn(4, 8)], dropout=torch.randn(2, 8)) for _ in range(2)]
    data = Embeddings([], alone=alone).to_bytes()
    assert set(load_safetensors(data)) == {"ref.0.prompt.0", "ref.0.dropout", "ref.1.prompt.0", "ref.1.dropout"}
    embeds = Embeddings.from_bytes(data)
    assert not embeds.prompts and embeds.dropout is None and len(embeds.alone) == 2
    for ours, theirs in zip(embeds.alone, alone, strict=True):
        assert torch.equal(ours.prompts[0], theirs.prompts[0].bfloat16()) and ours.alone is None
        assert torch.equal(ours.dropout, theirs.dropout.bfloat16())


def test_another_format_version_is_refused_with_the_command_that_rebuilds(tmp_path):
    (tmp_path / "cache.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(UserError, match=r"cache format 1, this version reads 2 .*prep build-cache .*--force"):
        CacheStore(tmp_path).read_info()


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "shards/../../x.tar", "shards/a.tar", "x"])
def test_paths_outside_the_cache_shards_are_refused(shard):
    with pytest.raises(UserError, match="not a shard of this cache"):
        check_shard_path(shard, "manifest.parquet")
    assert check_shard_path("shards/rank01-000002.tar", "m") == "shards/rank01-000002.tar"


def test_training_keeps_the_manifest_in_columns_of_at_most_200_bytes_per_row(tmp_path):
    """A 20k-row manifest (spans repeated over one real record) loads into NumPy arrays, no per-row objects."""
    # One real record to point at, written by the real writer.
    from shared.cache import EMBEDS, LATENTS, MANIFEST, MANIFEST_SCHEMA, META
    from shared.cache.writer import ShardWriter, commit
    from tests.cache_files import manifest_rows
    from train.loader import CacheReader

    writer = ShardWriter(CacheFolder(tmp_path), "fp")
    t = torch.zeros(16, 4, 4)
    members = {
        LATENTS: Latents(t, [t]).to_bytes(),
        EMBEDS: Embeddings([torch.zeros(3, 8)], dropout=torch.zeros(2, 8)).to_bytes(),
        META: b"{}",
    }
    row = {
        "dataset_id": "d",
        "relpath": "a.png",
        "split": "train",
        "height": 32,
        "width": 32,
        "original_size": [32, 32],
        "crop_box": [0, 0, 32, 32],
        "ref_sizes": [[32, 32]],
        "ref_crop_boxes": [[]],
        "prompt_lens": [3],
        "captions": ["c"],
        "source_sha256": "0",
    }
    writer.write("0" * 20, members, row)
    writer.finish_shard()
    info = {
        "format_version": 2,
        "dataset_id": "d",
        "flavour": "edit-v1",
        "fingerprint": {"sha256": "fp", "settings": {}},
        "counts": {},
    }
    commit(CacheFolder(tmp_path), writer.rows, writer.shards, info)
    (tmp_path / "cache.json").write_text(json.dumps(info))

    n = 20_000
    one = pq.read_table(tmp_path / MANIFEST)
    table = one.take(pa.array(np.zeros(n, dtype=np.int64)))
    ids = pa.array([f"{i:020x}" for i in range(n)])
    table = table.set_column(0, "sample_id", ids).cast(MANIFEST_SCHEMA).replace_schema_metadata(one.schema.metadata)
    pq.write_table(table, tmp_path / MANIFEST)

    reader = CacheReader(str(tmp_path))
    arrays = [v for v in vars(reader).values() if isinstance(v, np.ndarray)]
    arrays += [a for spans in reader.spans.values() for a in spans]
    assert sum(a.nbytes for a in arrays) / n <= 200
    assert not any(isinstance(v, (list, tuple, dict)) and len(v) >= n for v in vars(reader).values())
    assert len(manifest_rows(tmp_path)) == n and reader.row(n - 1).sample_id == f"{n - 1:020x}"


def test_an_embedding_sharing_leading_rows_with_the_first_prompt_is_stored_as_the_rows_after_them():
    prompt = torch.randn(1000, 64)
    dropout = torch.cat([prompt[:990], torch.randn(4, 64)])  # same template and image tokens, another instruction
    second = torch.cat([prompt[:995], torch.randn(12, 64)])
    negative_unshared = torch.randn(20, 64)
    data = Embeddings([prompt, second], dropout=dropout).to_bytes()
    stored = load_safetensors(data)
    assert set(stored) == {"prompt.0", "prompt.1.after", "prompt.1.shared_rows", "dropout.after", "dropout.shared_rows"}
    assert stored["dropout.after"].shape == (4, 64) and int(stored["dropout.shared_rows"][0]) == 990
    assert len(data) < 1.1 * prompt.numel() * 2  # about one prompt's bf16 bytes, not three
    embeds = Embeddings.from_bytes(data)
    assert torch.equal(embeds.dropout, dropout.bfloat16()) and torch.equal(embeds.prompts[1], second.bfloat16())
    assert torch.equal(embeds.prompts[0], prompt.bfloat16())

    # nothing shared: stored whole; a -0 against a 0 is a different bit pattern, so it is not "shared"
    zero = torch.zeros(6, 64)
    data = Embeddings([zero], negative=-zero).to_bytes()
    assert set(load_safetensors(data)) == {"prompt.0", "negative"}
    assert torch.equal(Embeddings.from_bytes(data).negative.view(torch.int16), (-zero).bfloat16().view(torch.int16))
    data = Embeddings([prompt], negative=negative_unshared).to_bytes()
    assert set(load_safetensors(data)) == {"prompt.0", "negative"}

    # the form the manifest records (embeds_form)
    assert Embeddings([prompt, second], dropout=dropout).stored()[1] == EMBEDS_SHARED_PREFIX
    assert Embeddings([prompt], negative=negative_unshared).stored()[1] == EMBEDS_WHOLE

    # per reference, against that reference's own first prompt
    alone = [Embeddings([p], dropout=torch.cat([p[:7], torch.randn(2, 64)])) for p in torch.randn(2, 9, 64)]
    data = Embeddings([], alone=alone).to_bytes()
    assert {k for k in load_safetensors(data) if k.endswith(".after")} == {"ref.0.dropout.after", "ref.1.dropout.after"}
    for ours, theirs in zip(Embeddings.from_bytes(data).alone, alone, strict=True):
        assert torch.equal(ours.dropout, theirs.dropout.bfloat16())


def test_a_shard_is_hashed_as_it_is_written_and_every_recorded_span_and_hash_matches_its_bytes(tmp_path):
    """Offsets, sizes and sha256s come from the writer's stream, never from reading the shard back: they must
    equal what the finished file holds, for records of every size."""
    import hashlib

    from shared.cache import MEMBERS, member_column
    from shared.cache.writer import ShardWriter

    writer = ShardWriter(CacheFolder(tmp_path), "fp", max_shard_bytes=1 << 30)
    sizes = [1, 700, 9_000, 40_000, 3, 25_000]  # members of many sizes: ends inside 512-byte tar blocks
    for n, size in enumerate(sizes):
        members = {m: bytes([n + k]) * (size + k) for k, m in enumerate(MEMBERS)}
        writer.write(f"sample{n:02d}", members, {"relpath": f"{n}.png"})
    writer.finish_shard()

    ((name, shard),) = writer.shards.items()
    data = (tmp_path / name).read_bytes()
    assert shard == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for n, row in enumerate(writer.rows):
        start, size = row["record_offset"], row["record_size"]
        assert row["record_sha256"] == hashlib.sha256(data[start : start + size]).digest()
        for k, member in enumerate(MEMBERS):
            offset, length = row[member_column(member, "offset")], row[member_column(member, "size")]
            assert start <= offset and offset + length <= start + size
            assert data[offset : offset + length] == bytes([n + k]) * (sizes[n] + k)
    assert writer.rows[0]["record_offset"] == 0
    for before, after in zip(writer.rows[:-1], writer.rows[1:], strict=True):
        assert after["record_offset"] == before["record_offset"] + before["record_size"]  # records follow each other


def test_a_shard_is_the_tar_that_webdataset_writes_and_every_tar_reader_lists_its_members(tmp_path):
    """The writer builds the tar itself (one write per member, no tar stream); the file must be the bytes
    webdataset's TarWriter(mtime=0) gives for the same records, so tar, webdataset and older caches agree."""
    import hashlib
    import io
    import tarfile

    import webdataset as wds

    from shared.cache import MEMBERS, member_column
    from shared.cache.writer import ShardWriter

    writer = ShardWriter(CacheFolder(tmp_path), "fp", max_shard_bytes=1 << 30)
    records = [
        (f"sample{n:02d}", {m: bytes([n + k]) * (n * 3_001 + k) for k, m in enumerate(MEMBERS)}) for n in range(4)
    ]
    records.append(("a" * 120, {m: b"long name" for m in MEMBERS}))  # past ustar's 100 characters: a pax header
    for key, members in records:
        writer.write(key, members, {"relpath": f"{key}.png"})
    writer.finish_shard()
    ((name, _),) = writer.shards.items()
    data = (tmp_path / name).read_bytes()

    expected = io.BytesIO()
    with wds.TarWriter(expected, mtime=0) as tar:
        for key, members in records:
            tar.write({"__key__": key, **members})
    assert data == expected.getvalue()
    with tarfile.open(tmp_path / name) as tar:
        listed = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    for (key, members), row in zip(records, writer.rows, strict=True):
        for member in MEMBERS:
            offset, size = row[member_column(member, "offset")], row[member_column(member, "size")]
            assert listed[f"{key}.{member}"] == (offset, size)
            assert row[member_column(member, "sha256")] == hashlib.sha256(members[member]).digest()


@pytest.mark.parametrize("member_bytes", [30_000, 100])  # small members sit in the file's buffer when the disk fills
def test_a_disk_error_mid_record_drops_the_open_shard_and_the_writer_starts_a_clean_one(
    tmp_path, monkeypatch, member_bytes
):
    """A full disk while a record is half written: the user is told the disk is full, that shard is never
    sealed (it would hold half a record) and leaves no file; once there is space the next shard is whole."""
    import errno
    import hashlib
    import io

    import shared.cache.folder as folder_module
    from shared.cache import MEMBERS
    from shared.cache.writer import ShardWriter

    class FillingDisk(io.RawIOBase):
        """A real file on a disk with `room` bytes left: writes past it fail as the OS fails them."""

        def __init__(self, path, room: int):
            self.file, self.room = open(path, "wb", buffering=0), room  # noqa: SIM115

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.file.write(data)

        def close(self) -> None:
            self.file.close()
            super().close()

    writer = ShardWriter(CacheFolder(tmp_path), "fp", max_shard_bytes=1 << 30)
    members = {m: b"x" * member_bytes for m in MEMBERS}
    writer.write("a", members, {})
    writer.finish_shard()
    room = 3 * member_bytes + 1000  # the disk fills inside the next record
    monkeypatch.setattr(
        folder_module, "open", lambda path, mode: io.BufferedWriter(FillingDisk(path, room)), raising=False
    )
    with pytest.raises(UserError, match="disk is full"):
        for n in range(50):
            writer.write(f"b{n}", members, {})
        writer.finish_shard()
    assert not list((tmp_path / "shards").glob("*.tmp")), "the half-written shard must not stay"

    monkeypatch.undo()  # space was freed
    writer.write("c", members, {})
    writer.finish_shard()
    assert [r["sample_id"] for r in writer.rows] == ["a", "c"]
    for name, shard in writer.shards.items():
        assert shard["sha256"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "flavour, resolution, model_kwargs, recorded",
    [
        ("edit-v2", 1024, {}, False),  # at 1024 the ~1 MP rule encodes what caches before it did: still current
        ("edit-v2", 512, {}, True),  # below it the references are now ~1 MP: such caches must be rebuilt
        ("edit-v2", 512, {"match_target_res": True}, False),
        ("edit-v1", 512, {}, False),
    ],
)
def test_the_plus_reference_size_rule_is_in_the_fingerprint_only_where_it_changed_a_cache(
    tmp_path, flavour, resolution, model_kwargs, recorded
):
    from shared.cache.fingerprint import config_settings
    from shared.config import load_config

    backend = [
        {"id": "e", "instance_data_dir": "/i", "conditioning_data": ["r"], "resolution": resolution},
        {"id": "r", "dataset_type": "conditioning", "instance_data_dir": "/r", "resolution": resolution},
    ]
    (tmp_path / "db.json").write_text(json.dumps(backend))
    config = {"data_backend_config": str(tmp_path / "db.json"), "model_flavour": flavour, "model_kwargs": model_kwargs}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_config(tmp_path / "config.json")
    settings = config_settings(loaded, loaded.main_datasets()[0])
    assert ("plus_reference_vae_area" in settings) == recorded
