"""Which samples are held out for evaluation (previews and the held-out loss), and never trained on.

With `eval_dataset_id`, that whole dataset is the eval split (set while scanning). Without one,
each main dataset holds out `eval_holdout` samples: those with the smallest sample ids, so the
choice is deterministic, independent of file order, and stays put when other files are added
(a new file only joins the eval split if its id sorts before the held-out ones). Unless the user
sets `eval_holdout`, at most one sample in eight is held out, so a small dataset keeps most of its data.
"""

from __future__ import annotations

from dataclasses import replace

from prep.scan import Sample
from shared.config import Config


def holdout_count(config: Config, n_samples: int) -> int:
    """How many of a dataset's `n_samples` samples are held out (0 with an eval dataset)."""
    if config.train.eval_dataset_id:
        return 0
    wanted = config.train.eval_holdout
    if "eval_holdout" not in config.explicit:
        wanted = min(wanted, n_samples // 8)
    return min(wanted, max(n_samples - 1, 0))  # at least one sample always trains


def hold_out(config: Config, samples: list[Sample]) -> list[Sample]:
    """`samples` with the held-out ones marked `split="eval"` (same order)."""
    n = holdout_count(config, len(samples))
    held = set(sorted(s.sample_id for s in samples)[:n])
    return [replace(s, split="eval") if s.sample_id in held else s for s in samples]
