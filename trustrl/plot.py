"""Curves comparing runs: ``python -m trustrl.plot WORKDIR [WORKDIR ...] --out DIR``.

Writes one PNG per metric (runs overlaid, labelled by workdir name) for the metrics present
in the runs' metrics.jsonl. Runs whose names differ only in a trailing ``_seedN`` are also
drawn as a mean with a min-max band when ``--group_seeds`` is given.
"""
from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict

import numpy as np

from trustrl.metrics import read_jsonl

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


def plot_runs(workdirs, out_dir, metrics=DEFAULT_METRICS, group_seeds=False, smooth=1):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for wd in workdirs:
        path = os.path.join(wd, "metrics.jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no metrics.jsonl in {wd!r}")
        runs[os.path.basename(os.path.normpath(wd))] = read_jsonl(path)
    groups = defaultdict(list)
    for name, rows in runs.items():
        groups[re.sub(r"_seed\d+$", "", name) if group_seeds else name].append(rows)
    os.makedirs(out_dir, exist_ok=True)
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
            if smooth > 1:
                kernel = np.ones(smooth) / smooth
                ys = np.stack([np.convolve(np.pad(y, (smooth - 1, 0), mode="edge"), kernel,
                                           mode="valid") for y in ys])
            line, = ax.plot(x, ys.mean(0), label=f"{label}" + (f" (n={len(ys)})"
                                                               if len(ys) > 1 else ""))
            if len(ys) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.2, color=line.get_color())
        ax.set_xlabel("iteration")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = os.path.join(out_dir, key.replace("/", "_").replace("@", "_at_") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", default=None, help="output folder (default: WORKDIR/plots)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    p.add_argument("--group_seeds", action="store_true")
    p.add_argument("--smooth", type=int, default=1)
    a = p.parse_args(argv)
    out = a.out or os.path.join(a.workdirs[0], "plots")
    written = plot_runs(a.workdirs, out, a.metrics.split(","), a.group_seeds, a.smooth)
    print(f"wrote {len(written)} plots to {out}")
    return written


if __name__ == "__main__":
    main()
