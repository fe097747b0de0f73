"""`prep inspect CACHE`: what a cache holds: counts, buckets, token lengths, bytes, fingerprint."""

from __future__ import annotations

from collections import Counter

from shared.cache import DROPOUT_SHARD, CacheStore


def describe_cache(cache_dir: str, bins: int = 8) -> str:
    store = CacheStore(cache_dir)
    info = store.read_info()
    wanted = ["split", "prompt_lens", "width", "height", "ref_sizes", "embeds_form", DROPOUT_SHARD]
    present = store.manifest_columns()
    rows = store.read_manifest(columns=[c for c in wanted if c in present]).to_pylist()
    counts = info["counts"]
    settings = info["fingerprint"]["settings"]
    n = max(len(rows), 1)
    lines = [
        f"cache {cache_dir} ({info['flavour']}, dataset '{info.get('dataset_id', '?')}', "
        f"format {info['format_version']})",
        f"samples: {len(rows)} (train {sum(r['split'] == 'train' for r in rows)}, "
        f"eval {sum(r['split'] == 'eval' for r in rows)}); captions: {sum(len(r['prompt_lens']) for r in rows)}",
        f"shards: {counts.get('shards', '?')}, {counts['shard_bytes'] / 2**20:.1f} MiB, "
        f"{counts['shard_bytes'] / n / 1024:.1f} KiB/sample",
        "embeddings stored: "
        + (
            ", ".join(
                f"{form or 'form not recorded'} {c}" for form, c in Counter(r.get("embeds_form") for r in rows).items()
            )
        ),
        _dropout_line(rows, DROPOUT_SHARD in present),
        f"fingerprint: {info['fingerprint']['sha256'][:16]} (model {settings.get('model')}, "
        f"dtype {settings.get('dtype')}, built {info.get('created')})",
        "buckets (target width x height: samples):",
    ]
    buckets = Counter((r["width"], r["height"]) for r in rows)
    lines += [f"  {w}x{h}: {c}" for (w, h), c in sorted(buckets.items(), key=lambda kv: -kv[1])]
    refs = Counter(tuple(f"{w}x{h}" for h, w in r["ref_sizes"]) for r in rows)
    lines.append("reference sizes (VAE, width x height: samples):")
    lines += [f"  {', '.join(k)}: {c}" for k, c in sorted(refs.items(), key=lambda kv: -kv[1])]
    lengths = sorted(length for r in rows for length in r["prompt_lens"])
    if lengths:
        lo, hi = lengths[0], lengths[-1]
        width = max(1, -(-(hi - lo + 1) // bins))
        histogram = Counter((length - lo) // width for length in lengths)
        lines.append(f"VL embedding length (tokens): min {lo}, median {lengths[len(lengths) // 2]}, max {hi}")
        peak = max(histogram.values())
        for b in range(-(-(hi - lo + 1) // width)):
            start = lo + b * width
            bar = "#" * max(1 if histogram[b] else 0, round(30 * histogram[b] / peak))
            lines.append(f"  {start:>6}-{start + width - 1:<6} {histogram[b]:>6} {bar}")
    return "\n".join(lines)


def _dropout_line(rows: list[dict], recorded: bool) -> str:
    """How many train samples hold the empty-instruction embedding caption dropout trains on."""
    if not recorded:
        return "dropout embeddings: inside each train sample's embeddings (a cache from before dropout records)"
    train = [r for r in rows if r["split"] == "train"]
    held = sum(r.get(DROPOUT_SHARD) is not None for r in train)  # "": inside the embeddings member
    why = "" if held == len(train) else " (caption dropout needs all: `prep build-cache` adds them)"
    return f"dropout embeddings: {held} of {len(train)} train samples{why}"
