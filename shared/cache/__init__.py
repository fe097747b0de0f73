"""The cache: the only contract between `prep` (writer) and `train` (reader). Format version 2.

This docstring is the format's full description; `format.py` holds its names and schema,
`store.py` the one reader (local paths and fsspec URLs), `writer.py` the writer, `folder.py` what
the writer writes through (a local dir or an fsspec URL: `s3://bucket/cache`), `lock.py` the build
lock (durable local writes: `shared/files.py`).

Layout of one cache (one per main dataset; a local dir or a prefix at a URL)::

    <cache>/cache.json              format_version, flavour, dataset_id, fingerprint, counts, created,
                                    manifest_sha256 (the manifest's bytes as written; `prep verify` checks it)
    <cache>/manifest.parquet        one row per sample; shard table and fingerprint in its metadata
    <cache>/shards/000000.tar       webdataset tars (`rankNN-000000.tar` from a distributed build)
    <cache>/shards/dropout-000000.tar   dropout records (`rankNN-dropout-000000.tar`), see below
    <cache>/validation.parquet      prep only: per-file record of validated images (size, mtime, inode)
    <cache>/build.lock              prep only: held by the running build; names its holder (at an s3://
                                    URL: rewritten by the build every minute, removed at its end; a killed
                                    build's stays until the next build takes it over)
    <cache>/damaged.json            prep only: {"shards": [...]} that `prep verify` found damaged; the next
                                    build encodes their samples again and removes the file

**Shards.** Plain POSIX tars as webdataset writes them: one record per sample, key = sample id
(20 hex characters), members in this order, each preceded by its 512-byte tar header and padded
to 512 bytes; the archive ends with tar's zero blocks.

- `<id>.latents.safetensors`: `target` [C, H/8, W/8] and `ref.0`, `ref.1`, ... [C, h/8, w/8]
  (VAE latents, normalised as the pipelines do, bf16).
- `<id>.embeds.safetensors`: `prompt.0`, `prompt.1`, ... [L, D], one per caption; `negative`
  [L, D] on eval samples (`validation_negative_prompt` with the references). Train samples of a
  cache built with `conditioning_multidataset_sampling: random` and several reference datasets
  hold, in place of `prompt.k`, `ref.r.prompt.k` per reference r: the same instructions encoded
  with reference r alone (training picks one reference per sample each time it is drawn). bf16.
  L is each instruction's token count after the template's system prefix is dropped.
  Stored once: every tensor of a group (the sample's own, or reference r's `ref.r.`) after its
  `prompt.0` whose leading rows equal `prompt.0`'s bit for bit (instructions share the template
  and the image tokens; only the instruction's tokens differ) is stored as `NAME.after` (its rows
  after the shared prefix) and `NAME.shared_rows` (int64 [1], the prefix's length); readers rebuild
  `NAME` = `prompt.0[:shared_rows]` then `NAME.after` (`Embeddings.from_bytes`). A tensor that shares
  nothing is stored whole under `NAME`, as every tensor was before (such caches read the same).
- `<id>.json`: the record's provenance: captions, sizes, crop boxes, seeds, source sha256s.

**Dropout records** (optional; caption dropout trains on them): a train sample's empty instruction
encoded with its references, `dropout` [L, D] (`ref.r.dropout` per reference where the embeddings
member holds `ref.r.`), alone in a record `<id>.dropout.safetensors` in a `dropout-` shard, stored
as the rows after those it shares with the embeddings member's `prompt.0` (`dropout.after`,
`dropout.shared_rows`: the reader needs both members). Which optional records a config needs is
decided in one place, `format.needs_dropout` (caption_dropout_probability > 0): a build with
caption dropout off encodes none (one language-model pass per sample less); a later build that
needs them encodes only those (the images' VL pass, no VAE) into new `dropout-` shards, never
rewriting a shard; `train run` refuses a cache whose train samples lack them, naming the key and
that command. Caches written before these records existed (no `dropout_shard` column) hold
`dropout` in the embeddings member, and read the same.

Tensors are safetensors (loading runs no code). `Latents` and `Embeddings` (format.py) are the
typed views every reader and writer uses.

**manifest.parquet** (schema `MANIFEST_SCHEMA`): `sample_id`, `dataset_id`, `relpath`, `split`
(train/eval), `shard` (always `shards/NAME.tar`: readers refuse anything else); `record_offset`,
`record_size`, `record_sha256`: the sample's whole byte range in its shard (headers, data,
padding); per member (`latents_`, `embeds_`, `json_`) `offset`, `size` of its data and its
`sha256`; then `height`, `width`, `original_size`, `crop_box`, `ref_sizes`, `ref_crop_boxes`,
`prompt_lens` (per caption; over references cached alone, the longest), `embeds_form`
(`whole`: every embedding stored whole; `shared_prefix`: some stored as `NAME.after`, see above;
null in manifests written before the column existed, which read the same), `dropout_shard`,
`dropout_offset`, `dropout_size`, `dropout_sha256` (the dropout record's shard and its member's
data; null where the sample has none), `captions`, `source_sha256`. Digests are raw 32-byte
sha256 values, except `source_sha256` (hex). The Parquet schema metadata holds `fingerprint`
(hex), `format_version`, and `shards`: JSON `{"shards/NAME.tar": {"bytes": n, "sha256": hex}}` for
every shard it names (dropout shards too), recorded when the shard was sealed. `prep verify` checks
whole shards against that table, walks every tar header, and names the samples whose records
changed.

**Fingerprint.** cache.json's `fingerprint` = {`sha256`, `settings`}: everything that changes
cached bytes (the encoders by content: `encoders` maps each file of the model's `vae/`,
`text_encoder/`, `processor/` and `tokenizer/` to its sha256, never the model's path; the VAE's and
text encoder's configs; flavour, prompt template, encoder dtype, reference sizing (`match_target_res`;
`plus_reference_vae_area`: the Plus flavours encode every reference at ~1 MP, recorded where a dataset's
or the previews' resolution is not 1024, the caches that rule changed), and per dataset:
resolution, crop settings; the `crop_seed` only when a dataset crops at random;
`conditioning_multidataset_sampling` only when it is random with several reference datasets).
Training-only keys (seed, caption dropout, learning rate, ...) are not in it, so changing them
never invalidates a cache. `train run` checks a cache against what training depends on
(`training_mismatches`: the config's settings, the VAE config, the transformer's input widths
against the cached latents' channels and embeddings' width), reading only the transformer's and
VAE's configs: a training node needs no text encoder, and the model may lie anywhere. The
manifest carries the same hash; a reader that finds them unequal is looking at a build cut short
between the two writes.

**Writing.** Shards are written as `.tar.tmp`, hashed, fsynced and renamed; their rows go to
`shards/NAME.index.parquet` (fsynced, atomic) so an interrupted build resumes from the last
sealed shard. The manifest, then cache.json, are replaced atomically (write, fsync, rename, fsync
dir); only then are unreferenced shards and index files removed. One build at a time holds
`build.lock` (an flock, released by the kernel if the build is killed). At an `s3://` URL each
file is uploaded under its final name and appears only when its upload completes (no `.tmp`, no
rename), in the same order; a shard's multipart upload is completed only when it is sealed.
`build.lock` is created only where none exists (S3's conditional write), renewed by a conditional
overwrite of its own version, and taken over (conditionally) when the store last saw it written 10
minutes ago or its holder was a process of this machine that has ended (shared/cache/lock.py).

**Versions.** This code reads format 2 only; a cache of another version is refused with the
command that rebuilds it.
"""

from shared.cache.folder import CacheFolder
from shared.cache.format import (
    CACHE_JSON,
    DAMAGED,
    DROPOUT,
    DROPOUT_COLUMNS,
    DROPOUT_SHARD,
    EMBEDS,
    FORMAT_VERSION,
    LATENTS,
    LOCK,
    MANIFEST,
    MANIFEST_SCHEMA,
    MEMBERS,
    META,
    SHARDS_DIR,
    TRAIN_COLUMNS,
    VALIDATION,
    Embeddings,
    Latents,
    member_column,
    needs_dropout,
)
from shared.cache.lock import CacheLock, lock_cache
from shared.cache.store import CacheStore, check_shard_path, manifest_metadata, parse_cache_info
from shared.files import write_atomic, write_json_atomic

__all__ = [
    "CACHE_JSON",
    "DAMAGED",
    "DROPOUT",
    "DROPOUT_COLUMNS",
    "DROPOUT_SHARD",
    "EMBEDS",
    "FORMAT_VERSION",
    "LATENTS",
    "LOCK",
    "MANIFEST",
    "MANIFEST_SCHEMA",
    "MEMBERS",
    "META",
    "SHARDS_DIR",
    "TRAIN_COLUMNS",
    "VALIDATION",
    "CacheFolder",
    "CacheLock",
    "CacheStore",
    "Embeddings",
    "Latents",
    "check_shard_path",
    "lock_cache",
    "manifest_metadata",
    "member_column",
    "needs_dropout",
    "parse_cache_info",
    "write_atomic",
    "write_json_atomic",
]
