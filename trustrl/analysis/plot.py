"""Curves comparing runs: ``python -m trustrl.analysis.plot WORKDIR [WORKDIR ...] --out DIR``.

Writes one PNG per metric (runs overlaid, labelled by workdir name) for the metrics present
in the runs' metrics.jsonl. Each run has its own (colour, line style) pair; its raw values are
drawn faint with a trailing moving average (``--smooth`` iterations) on top. Series too short to
smooth (the evals) are drawn as plain lines with markers. Runs whose names differ only in a
trailing ``_seedN`` are also drawn as a mean with a min-max band when ``--group_seeds`` is given.
"""
from __future__ import annotations

import argparse
import io
import re
from collections import defaultdict

import numpy as np

from trustrl.infra import storage
from trustrl.infra.metrics import read_jsonl

DEFAULT_METRICS = (
    "reward/mean", "eval/pass@1", "eval/sampled_reward_mean", "rollout/mismatch_mean",
    "rollout/mismatch_max",
    "rollout/mismatch_min", "loss/masked_frac", "loss/masked_frac_pos", "loss/masked_frac_neg",
    "train/entropy", "response/length_mean", "loss/div_mean", "train/grad_norm",
)


def _series(rows, key):
    xs = [r["step"] for r in rows if isinstance(r.get(key), (int, float))]
    ys = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return np.asarray(xs), np.asarray(ys, dtype=float)


def moving_average(y, window: int) -> np.ndarray:
    """Trailing moving average: out[i] = mean(y[max(0, i - window + 1) : i + 1]) (the first
    window - 1 points average what is available, so the start is not pulled toward y[0])."""
    if window < 1:
        raise ValueError(f"moving-average window must be >= 1, got {window}")
    y = np.asarray(y, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


LINESTYLES = ("-", "--", ":", "-.")


def run_styles(n: int) -> list[tuple[str, str]]:
    """n distinct (colour, linestyle) pairs: the 10 tab10 colours with each line style in turn
    (40 pairs), beyond that n colours spread over a continuous colour map."""
    import matplotlib
    if n <= 10 * len(LINESTYLES):
        colours = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
        return [(colours[i % 10], LINESTYLES[i // 10]) for i in range(n)]
    cmap = matplotlib.colormaps["turbo"]
    return [(matplotlib.colors.to_hex(cmap(i / (n - 1))), LINESTYLES[i % len(LINESTYLES)])
            for i in range(n)]


def plot_runs(workdirs, out_dir, metrics=DEFAULT_METRICS, group_seeds=False, smooth=10):
    if smooth < 1:
        raise ValueError(f"smooth (a moving-average window in iterations) must be >= 1, "
                         f"got {smooth}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for wd in workdirs:
        path = storage.join(wd, "metrics.jsonl")
        if not storage.exists(path):
            raise FileNotFoundError(f"no metrics.jsonl in {wd!r}")
        runs[storage.basename(wd)] = read_jsonl(path)
    groups = defaultdict(list)
    for name, rows in runs.items():
        groups[re.sub(r"_seed\d+$", "", name) if group_seeds else name].append(rows)
    styles = dict(zip(sorted(groups), run_styles(len(groups))))  # same style in every plot
    storage.makedirs(out_dir)
    written = []
    for key in metrics:
        if not any(_series(rows, key)[0].size for rows in runs.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, members in sorted(groups.items()):
            curves = [_series(rows, key) for rows in members]
            curves = [c for c in curves if c[0].size]
            if not curves:
                continue
            n = min(len(c[0]) for c in curves)
            x = curves[0][0][:n]
            ys = np.stack([c[1][:n] for c in curves])
            colour, ls = styles[label]
            name = f"{label}" + (f" (n={len(ys)})" if len(ys) > 1 else "")
            if len(ys) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.12, color=colour, lw=0)
            if smooth > 1 and n >= 2 * smooth:
                ax.plot(x, ys.mean(0), color=colour, ls=ls, lw=0.7, alpha=0.3)
                ax.plot(x, moving_average(ys.mean(0), smooth), color=colour, ls=ls, lw=1.6,
                        label=f"{name}, {smooth}-iteration mean")
            else:
                ax.plot(x, ys.mean(0), color=colour, ls=ls, lw=1.4, marker="o" if n <= 30 else None,
                        ms=3, label=name)
        ax.set_xlabel("iteration")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = storage.join(out_dir, key.replace("/", "_").replace("@", "_at_") + ".png")
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        storage.write(path, png.getvalue())  # whole, atomically (local or object storage)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", default=None, help="output folder (default: WORKDIR/plots)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    p.add_argument("--group_seeds", action="store_true")
    p.add_argument("--smooth", type=int, default=10,
                   help="moving-average window in iterations (1: raw values only)")
    a = p.parse_args(argv)
    out = a.out or storage.join(a.workdirs[0], "plots")
    written = plot_runs(a.workdirs, out, a.metrics.split(","), a.group_seeds, a.smooth)
    print(f"wrote {len(written)} plots to {out}")
    return written


if __name__ == "__main__":
    main()
