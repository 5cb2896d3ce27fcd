"""A run's closing summary: ``python -m trustrl.analysis.summary WORKDIR``.

Single iterations are noisy (one iteration's reward is the mean of prompts_per_iter x group_size
samples of a moving policy), so the summary compares windowed means: the first and last
``window`` iterations of the training reward, each with the standard error of the mean over its
iterations. The held-out scores compare the first eval (step 0: the base before any update) with
the last, each with its sampling error:

- greedy pass@1 over n prompts: binomial standard error sqrt(p (1 - p) / n);
- sampled reward (k samples per prompt): standard error over prompts (``eval/sampled_reward_se``);
- a change: sqrt(se_before^2 + se_after^2), the error of a difference of independent estimates.
  Both evals use the same prompts, whose outcomes correlate positively, so this overstates the
  error of the change (a conservative interval).
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np

WINDOW = 10


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion p estimated from n independent trials."""
    if n < 1:
        raise ValueError(f"binomial_se needs n >= 1 trials, got {n}")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def _window_mean(values: np.ndarray) -> tuple[float, float]:
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return float(values.mean()), float(se)


def _change(before: dict, after: dict) -> dict:
    return {"value": after["value"] - before["value"],
            "se": math.sqrt(before["se"] ** 2 + after["se"] ** 2)}


# held-out metrics summarised (before -> after) and where each one's standard error is logged
EVAL_SE = {"eval/pass@1": None, "eval/sampled_reward_mean": "eval/sampled_reward_se",
           # RLHF (trustrl.training.evaluation.evaluate_reward_model)
           "eval/rm_score": "eval/rm_score_se", "eval/ground_truth_mean": "eval/ground_truth_se"}
# training metrics other than reward/mean summarised over the first / last window when logged
# (RLHF: the reward model's raw score and the hidden ground truth of a synthetic task)
TRAIN_EXTRA = ("reward/rm_mean", "reward/ground_truth_mean")


def _eval_point(row: dict, key: str) -> dict:
    n = row.get("eval/num_prompts")
    value = float(row[key])
    if key == "eval/pass@1":
        se = binomial_se(value, int(n)) if n else math.nan
    else:
        se = float(row.get(EVAL_SE[key], math.nan))
    return {"step": row["step"], "value": value, "se": se, "n": n}


def summarize(rows: list[dict], window: int = WINDOW) -> dict:
    """Windowed training reward and held-out change from metrics.jsonl rows (read_jsonl order).

    Returns {"train": {"first", "last", "change"}, "eval": {metric: {"before", "after",
    "change"}}, "non_finite": [(step, key)]}; each point is {"value", "se", ...}."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    train = [r for r in rows if "reward/mean" in r]
    if not train:
        raise ValueError("no training rows (with 'reward/mean') in the metrics: nothing to "
                         "summarise")
    reward = np.asarray([r["reward/mean"] for r in train], dtype=float)
    steps = [r["step"] for r in train]
    non_finite = [(r["step"], k) for r in rows for k, v in r.items()
                  if k.startswith(("reward/", "eval/")) and isinstance(v, float)
                  and not math.isfinite(v)]
    w = min(window, len(reward))
    first, last = _window_mean(reward[:w]), _window_mean(reward[-w:])
    out = {"train": {
        "first": {"value": first[0], "se": first[1], "steps": (steps[0], steps[w - 1])},
        "last": {"value": last[0], "se": last[1], "steps": (steps[-w], steps[-1])}},
        "eval": {}, "non_finite": non_finite, "window": w}
    out["train"]["change"] = _change(out["train"]["first"], out["train"]["last"])
    out["train_extra"] = {}
    for key in TRAIN_EXTRA:
        values = np.asarray([r[key] for r in train if isinstance(r.get(key), (int, float))])
        if len(values):
            wk = min(window, len(values))
            a, b = _window_mean(values[:wk]), _window_mean(values[-wk:])
            first, last = {"value": a[0], "se": a[1]}, {"value": b[0], "se": b[1]}
            out["train_extra"][key] = {"first": first, "last": last,
                                       "change": _change(first, last)}
    for key in EVAL_SE:
        evals = [r for r in rows if isinstance(r.get(key), (int, float))]
        if len(evals) >= 2:  # one eval has no change to report
            before, after = _eval_point(evals[0], key), _eval_point(evals[-1], key)
            out["eval"][key] = {"before": before, "after": after, "change": _change(before, after)}
    return out


def _pm(point: dict, digits: int = 3) -> str:
    if math.isfinite(point["se"]):
        return f"{point['value']:.{digits}f} ± {point['se']:.{digits}f}"
    return f"{point['value']:.{digits}f}"


def _signed(point: dict) -> str:
    text = f"{point['value']:+.3f}"
    if math.isfinite(point["se"]) and point["se"] > 0:
        text += f" ± {point['se']:.3f} ({point['value'] / point['se']:+.1f} s.e.)"
    return text


def format_summary(s: dict) -> str:
    """The summary as a few plain lines (values ± one standard error)."""
    t, w = s["train"], s["window"]
    lines = [f"training reward, mean ± s.e. over {w} iterations: {_pm(t['first'])} (iterations "
             f"{t['first']['steps'][0]}-{t['first']['steps'][1]}) -> {_pm(t['last'])} "
             f"(iterations {t['last']['steps'][0]}-{t['last']['steps'][1]}); change "
             f"{_signed(t['change'])}"]
    for key, e in s.get("train_extra", {}).items():
        lines.append(f"training {key}, over {w} iterations: {_pm(e['first'])} -> "
                     f"{_pm(e['last'])}; change {_signed(e['change'])}")
    names = {"eval/pass@1": ("held-out greedy pass@1", "binomial s.e."),
             "eval/sampled_reward_mean": ("held-out T=1 reward", "s.e. over prompts"),
             "eval/rm_score": ("held-out greedy reward-model score", "s.e. over prompts"),
             "eval/ground_truth_mean": ("held-out greedy ground truth", "s.e. over prompts")}
    for key, e in s["eval"].items():
        name, how = names[key]
        b, a = e["before"], e["after"]
        n = (f"{b['n']} prompts, ± {how}" if b["n"]
             else "s.e. unknown: eval/num_prompts not logged")
        when = "before RL" if b["step"] == 0 else f"iteration {b['step']}: no step-0 eval"
        lines.append(f"{name} ({n}): {_pm(b)} ({when}) -> {_pm(a)} (iteration "
                     f"{a['step']}); change {_signed(e['change'])}")
    if not s["eval"]:
        lines.append("held-out: fewer than two evals in this run (eval.every = 0, or it stopped "
                     "before its second eval): no change to report")
    if s["non_finite"]:
        lines.append(f"WARNING non-finite values: {s['non_finite'][:5]}"
                     + (f" and {len(s['non_finite']) - 5} more" if len(s["non_finite"]) > 5
                        else ""))
    return "\n".join(lines)


def print_summary(rows: list[dict], window: int = WINDOW, file=None) -> dict:
    """Prints format_summary(summarize(rows, window)); returns the summary dict."""
    s = summarize(rows, window)
    print(format_summary(s), file=file or sys.stdout)
    return s


def main(argv=None):
    from trustrl.infra.metrics import read_jsonl
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--window", type=int, default=WINDOW)
    a = p.parse_args(argv)
    from trustrl.infra import storage
    path = storage.join(a.workdir, "metrics.jsonl")
    if not storage.exists(path):
        raise SystemExit(f"no metrics.jsonl in {a.workdir!r}")
    return print_summary(read_jsonl(path), a.window)


if __name__ == "__main__":
    main()
