"""`loss.png`: the training loss (raw and smoothed), the held-out loss and the learning rate in one chart, and
under it, when previews ran, their pixel error against the ground truth.

Drawn with matplotlib (its Agg backend: no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over the finite values of the last `window` steps (NaN where none are)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def plot_losses(
    steps: list[int],
    losses: list[float],
    lrs: list[float],
    heldout: list[tuple[int, float]],
    path: Path,
    preview_error: list[tuple[int, float]] | None = None,
) -> None:
    """Write the chart: loss per optimizer step (raw, and a moving average over ~5% of the run), the held-out
    loss as markers at the steps it was measured, and the learning rate on a second y axis; `preview_error`
    (step, mean |output − ground truth| in [0, 1]; step 0: the base model) in a panel below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if preview_error:
        fig, (ax, error_axis) = plt.subplots(
            2, 1, figsize=(10, 7.5), dpi=100, sharex=True, gridspec_kw={"height_ratios": [2, 1]}
        )
        error_axis.plot(*zip(*preview_error, strict=True), "s-", color="#2e8b57", markersize=6)
        error_axis.set_ylabel("preview pixel error")
        error_axis.set_ylim(bottom=0)
        error_axis.set_xlabel("optimizer step")
        error_axis.grid(True, alpha=0.3)
        error_axis.set_title("previews: mean |output − ground truth| over the eval samples (step 0: base model)")
    else:
        fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    if steps:
        ax.plot(steps, losses, color="#9db4e0", linewidth=0.8, label="training loss")
        window = min(len(steps), max(3, len(steps) // 20))  # at least 3 steps, ~5% of the run
        ax.plot(
            steps, smooth(losses, window), color="#1f4aa0", linewidth=2, label=f"training loss ({window}-step mean)"
        )
    if heldout:
        ax.plot(
            *zip(*heldout, strict=True), "o-", color="#d2691e", markersize=6, label="held-out loss (fixed σ, noise)"
        )
    if not preview_error:
        ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if steps:
        lr_axis = ax.twinx()
        lr_axis.plot(steps, lrs, color="#888888", linestyle="--", linewidth=1, label="learning rate")
        lr_axis.set_ylabel("learning rate")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        more_handles, more_labels = lr_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right", fontsize=9)
    ax.set_title("loss per step")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
