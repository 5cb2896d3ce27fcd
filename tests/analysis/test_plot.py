"""Training curves: distinct (colour, line style) per run, the smoothed series, step-0 rows."""
import json

import matplotlib
import numpy as np
import pytest

from trustrl.analysis import plot

matplotlib.use("Agg")


def test_moving_average_hand_values():
    y = [0.0, 1.0, 2.0, 3.0, 10.0]
    # window 3: [0/1, (0+1)/2, (0+1+2)/3, (1+2+3)/3, (2+3+10)/3]
    np.testing.assert_allclose(plot.moving_average(y, 3), [0.0, 0.5, 1.0, 2.0, 5.0])
    np.testing.assert_allclose(plot.moving_average(y, 1), y)
    np.testing.assert_allclose(plot.moving_average(y, 10), np.cumsum(y) / np.arange(1, 6))
    with pytest.raises(ValueError, match="window must be >= 1"):
        plot.moving_average(y, 0)


@pytest.mark.parametrize("n", [1, 11, 25, 40, 41, 60])
def test_run_styles_are_distinct(n):
    styles = plot.run_styles(n)
    assert len(styles) == n and len(set(styles)) == n


def _write_run(path, seed, iterations=30):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "eval/pass@1": 0.5}) + "\n")  # the step-0 eval row
        for s in range(1, iterations + 1):
            row = {"step": s, "reward/mean": float(rng.random())}
            if s % 10 == 0:
                row["eval/pass@1"] = 0.5 + s / 100
            f.write(json.dumps(row) + "\n")


def test_plot_of_25_runs(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    dirs = []
    for i in range(25):
        _write_run(tmp_path / f"run{i:02d}", i)
        dirs.append(str(tmp_path / f"run{i:02d}"))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to inspect them
    written = plot.plot_runs(dirs, str(tmp_path / "out"), ("reward/mean", "eval/pass@1"),
                             smooth=5)
    assert [p.rsplit("/", 1)[1] for p in written] == ["reward_mean.png", "eval_pass_at_1.png"]
    reward_ax, eval_ax = figures[0].axes[0], figures[1].axes[0]
    labelled = [ln for ln in reward_ax.get_lines() if not ln.get_label().startswith("_")]
    assert len(labelled) == 25
    pairs = {(ln.get_color(), ln.get_linestyle()) for ln in labelled}
    assert len(pairs) == 25  # tab10 reused: dppo_binary_kl and pg_is_fp32 both blue before
    # each run: a faint raw line, then its 5-iteration moving average in the same style
    lines = reward_ax.get_lines()
    raw, smoothed = lines[0], lines[1]
    assert raw.get_alpha() < 0.5 and smoothed.get_alpha() is None
    assert (raw.get_color(), raw.get_linestyle()) == (smoothed.get_color(),
                                                      smoothed.get_linestyle())
    y = np.asarray(raw.get_ydata())
    assert smoothed.get_ydata()[4] == pytest.approx(y[:5].mean())
    assert smoothed.get_ydata()[1] == pytest.approx(y[:2].mean())
    np.testing.assert_array_equal(raw.get_xdata(), np.arange(1, 31))  # step 0 has no reward
    # evals (4 points, step 0 included) are too short to smooth: one line with markers
    ev = [ln for ln in eval_ax.get_lines() if not ln.get_label().startswith("_")][0]
    np.testing.assert_array_equal(ev.get_xdata(), [0, 10, 20, 30])
    np.testing.assert_allclose(ev.get_ydata(), [0.5, 0.6, 0.7, 0.8])
    assert ev.get_marker() == "o"


def test_bad_smooth_and_missing_run(tmp_path):
    _write_run(tmp_path / "a", 0)
    with pytest.raises(ValueError, match="smooth .* must be >= 1, got 0"):
        plot.plot_runs([str(tmp_path / "a")], str(tmp_path / "out"), smooth=0)
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in"):
        plot.plot_runs([str(tmp_path / "missing")], str(tmp_path / "out"))
