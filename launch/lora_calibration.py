"""Trust-region calibration for LoRA (issue 29, item 7): how far does one iteration's updates
move the sampled tokens' probabilities under full fine-tuning vs LoRA, and how much would
DPPO-Binary-TV mask at delta 0.1 / 0.15 / 0.2?

    .venv/bin/python launch/lora_calibration.py --workdir=workdirs/lora_calibration --out=docs

Two arms on the default task (configs/default.py), each exactly as its config trains: ``full``
(the default run: every parameter, AdamW lr 1e-4) and ``lora`` (the ``lora`` variant: adapters
on every projection of the same frozen warm-started base, at that variant's learning rate).
Each arm is a real run (trustrl.training.loop.train: rollouts, score pass, DPPO updates at the
config's delta, evals, closing metrics) with its train step wrapped by a probe that scores the
minibatch's sampled tokens with the trainer's fp32 policy

- ``at step``: just before each optimizer step, i.e. the pi DPPO's mask is evaluated on in that
  step (minibatch k of an iteration sees the policy after k - 1 of the iteration's updates);
- ``after``: after the iteration's last update, on all of the iteration's tokens (how far the
  whole iteration moved the policy from mu; the next iteration samples from here).

mu is the rollout's recorded probability (the sampler's bf16 weights; for LoRA the adapters
merged into the base and cast). Per token it reports the binary-TV divergence of the sampled
token, |pi(a_t) - mu(a_t)|, and which tokens DPPO-Binary-TV blocks at each delta: the mask is
losses.policy_loss's own (trustrl.analysis.inspection.blocked_tokens: the tokens whose loss
gradient is exactly zero, i.e. A > 0 and pi > mu + delta, or A < 0 and pi < mu - delta), counted
over the tokens with A != 0 (as the run's loss/masked_frac). The counterfactual deltas do not
feed back into training: each arm trains at its config's delta (0.15), and the probe asks what
another delta would have masked on the same trajectory.

Writes the numbers into OUT/lora_calibration.md (between its generated-block markers; the prose
around them is kept), the plots to OUT/lora_calibration_plots/*.png, and
WORKDIR/ARM-sSEED/probe.npz (the per-token arrays; an arm whose probe.npz exists is not run
again: delete it to rerun).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from trustrl.analysis import inspection, summary  # noqa: E402
from trustrl.infra.metrics import read_jsonl  # noqa: E402
from trustrl.training import config_validation as cv  # noqa: E402
from trustrl.training import experiment, loop  # noqa: E402

ARMS = {"full": "default", "lora": "lora"}  # arm -> configs/default.py variant
# an arm may name another learning rate, NAME@LR (e.g. lora@3e-4): a control on how much of a
# difference the learning rate makes
DELTAS = (0.1, 0.15, 0.2)
GRID = tuple(np.round(np.arange(0.02, 0.505, 0.01), 3))  # deltas for the equivalence search
POINTS = ("at_step", "after")


def parse_arm(arm: str) -> tuple[str, float | None]:
    """"lora@3e-4" -> ("lora", 3e-4); "full" -> ("full", None)."""
    name, sep, lr = arm.partition("@")
    if name not in ARMS:
        raise ValueError(f"--arms: unknown arm {arm!r}; valid: {', '.join(ARMS)} (optionally "
                         f"@LEARNING_RATE)")
    try:
        return name, (float(lr) if sep else None)
    except ValueError:
        raise ValueError(f"--arms: {arm!r}: the learning rate after @ must be a number") from None


def arm_config(arm: str, seed: int, iterations: int, tiny: bool = False):
    name, lr = parse_arm(arm)
    cfg = default.get_config(("tiny" if name == "full" else "tiny_lora") if tiny else ARMS[name])
    if lr is not None:
        cfg.optim.learning_rate = lr
    cfg.seed = seed
    if iterations:
        cfg.train.iterations = iterations
    cfg.log.progress = False
    cfg.log.tensorboard = False
    cv.validate(cfg)
    return cfg


class Probe:
    """Wraps Run.train_step: records log pi of each minibatch's sampled tokens before its
    update (``at_step``) and, after an iteration's last update, of all its minibatches
    (``after``), with mu, the advantages and the response mask (host numpy)."""

    def __init__(self, run, steps_per_iter: int):
        self.run, self.inner, self.steps_per_iter = run, run.train_step, steps_per_iter
        self.pending, self.iteration = [], 0
        self.rows = {k: [] for k in ("at_step", "after", "mu", "adv", "mask", "iteration")}

    def _logp(self, params, mb):
        return np.asarray(self.run.score(self.run.policy_params(params), mb), np.float32)

    def __call__(self, state, mb, params_roll, frozen=None):
        at = self._logp(state.params, mb)  # before the step: state.params is donated by it
        state, metrics = self.inner(state, mb, params_roll, frozen)
        self.pending.append((mb, at))
        if len(self.pending) == self.steps_per_iter:
            for mb_i, at_i in self.pending:
                r = self.rows
                r["at_step"].append(at_i)
                r["after"].append(self._logp(state.params, mb_i))
                r["mu"].append(np.asarray(mb_i["rollout_logp"], np.float32))
                r["adv"].append(np.asarray(mb_i["advantages"], np.float32))
                r["mask"].append(np.asarray(mb_i["response_mask"], np.float32))
                r["iteration"].append(np.full(at_i.shape[0], self.iteration, np.int32))
            self.pending, self.iteration = [], self.iteration + 1
        return state, metrics

    def arrays(self) -> dict:
        return {k: np.concatenate(v) for k, v in self.rows.items()}


def run_arm(arm: str, seed: int, iterations: int, workdir: str, tiny: bool = False) -> str:
    """Trains one arm with the probe (unless WORKDIR/ARM-sSEED/probe.npz exists); returns its
    run directory."""
    wd = os.path.join(workdir, f"{arm}-s{seed}")
    if os.path.exists(os.path.join(wd, "probe.npz")):
        print(f"{arm} seed {seed}: reusing {wd}", flush=True)
        return wd
    if os.path.exists(wd):  # an interrupted arm: its probe rows are lost with it
        shutil.rmtree(wd)
    cfg = arm_config(arm, seed, iterations, tiny)
    probes, build = [], experiment.build

    def build_with_probe(*a, **k):
        run = build(*a, **k)
        probes.append(Probe(run, cfg.train.epochs * cfg.train.minibatches))
        run.train_step = probes[-1]
        return run

    experiment.build = build_with_probe
    t0 = time.perf_counter()
    try:
        loop.train(cfg, wd)
    finally:
        experiment.build = build
    np.savez_compressed(os.path.join(wd, "probe.npz"), **probes[0].arrays(),
                        wall_s=time.perf_counter() - t0)
    return wd


# ---------------------------------------------------------------------------------------------
# analysis


def masked(d: dict, point: str, delta: float) -> np.ndarray:
    """[rows, T] bool: the tokens DPPO-Binary-TV blocks at delta (losses.policy_loss's mask)."""
    return inspection.blocked_tokens(d[point], d["mu"], d["adv"], d["mask"],
                                     method="dppo_binary_tv", delta_low=delta, delta_high=delta)


def tv(d: dict, point: str) -> np.ndarray:
    return np.abs(np.exp(d[point].astype(np.float64)) - np.exp(d["mu"].astype(np.float64)))


def stats(d: dict, point: str, rows: np.ndarray, blocked: dict) -> dict:
    """TV quantiles over the valid tokens of ``rows`` and the blocked fraction per delta over
    those with A != 0."""
    valid = (d["mask"] > 0) & rows[:, None]
    informative = valid & (d["adv"][:, None] != 0)
    x = tv(d, point)[valid]
    out = {"tokens": int(valid.sum()), "informative": int(informative.sum()),
           "mean": float(x.mean()), "max": float(x.max())}
    for q in (50, 90, 99, 99.9):
        out[f"p{q}"] = float(np.percentile(x, q))
    for delta, b in blocked.items():
        out[f"masked@{delta:g}"] = float(b[informative].mean())
    return out


def per_iteration(d: dict, point: str, blocked: dict) -> dict:
    its = d["iteration"]
    n = int(its.max()) + 1
    out = {k: np.zeros(n) for k in ("p50", "p99", "max", *(f"masked@{x:g}" for x in DELTAS))}
    x = tv(d, point)
    for i in range(n):
        rows = its == i
        valid = (d["mask"] > 0) & rows[:, None]
        informative = valid & (d["adv"][:, None] != 0)
        xs = x[valid]
        out["p50"][i], out["p99"][i] = np.percentile(xs, 50), np.percentile(xs, 99)
        out["max"][i] = xs.max()
        for delta in DELTAS:
            out[f"masked@{delta:g}"][i] = blocked[delta][informative].mean() if \
                informative.any() else 0.0
    return out


def equivalent_delta(full_curve: dict, lora_curve: dict, delta: float) -> float:
    """The smallest grid delta at which LoRA masks no more than full fine-tuning does at
    ``delta`` (pooled masked fractions over the grid), NaN when none in the grid does."""
    target = full_curve[delta]
    for g in GRID:
        if lora_curve[g] <= target:
            return float(g)
    return float("nan")


def analyse(dirs: dict, out: str, args) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = os.path.join(out, "lora_calibration_plots")
    os.makedirs(plots, exist_ok=True)
    data = {key: dict(np.load(os.path.join(wd, "probe.npz"))) for key, wd in dirs.items()}
    results, curves, iters = {}, {}, {}
    for key, d in data.items():
        n_it = int(d["iteration"].max()) + 1
        phases = {"all": (0, n_it), "first third": (0, n_it // 3),
                  "last third": (n_it - n_it // 3, n_it)}
        for point in POINTS:
            blocked = {g: masked(d, point, float(g)) for g in sorted(set(GRID) | set(DELTAS))}
            informative = (d["mask"] > 0) & (d["adv"][:, None] != 0)
            curves[key + (point,)] = {g: float(b[informative].mean()) for g, b in
                                      blocked.items()}
            iters[key + (point,)] = per_iteration(d, point, blocked)
            for name, (lo, hi) in phases.items():
                rows = (d["iteration"] >= lo) & (d["iteration"] < hi)
                results[key + (point, name)] = stats(d, point, rows,
                                                     {x: blocked[x] for x in DELTAS})
    seeds = sorted({s for _, s in dirs})
    arms = sorted({a for a, _ in dirs}, key=lambda a: (a != "full", a))

    def pct(x):
        return f"{100 * x:.2f}%"

    lines = ["| arm | seed | point | iterations | tokens (A != 0) | mean TV | p50 | p90 | p99 | "
             "p99.9 | max | masked @0.1 | @0.15 | @0.2 |", "|" + "---|" * 14]
    for point in POINTS:
        for name in ("all", "first third", "last third"):
            for arm in arms:
                for s in seeds:
                    if (arm, s) not in data:
                        continue
                    r = results[(arm, s, point, name)]
                    lines.append(
                        f"| {arm} | {s} | {point} | {name} | {r['tokens']} ({r['informative']}) | "
                        f"{r['mean']:.2e} | "
                        f"{r['p50']:.2e} | {r['p90']:.2e} | {r['p99']:.3f} | {r['p99.9']:.3f} | "
                        f"{r['max']:.3f} | " + " | ".join(pct(r[f'masked@{x:g}'])
                                                        for x in DELTAS) + " |")
    eq = ["| arm | seed | point | full's delta | full masks | the arm's delta masking no more | "
          "the arm masks at full's delta |", "|---|---|---|---|---|---|---|"]
    for arm in arms[1:]:
        for s in seeds:
            if ("full", s) not in data or (arm, s) not in data:
                continue
            for point in POINTS:
                f, lo = curves[("full", s, point)], curves[(arm, s, point)]
                for x in DELTAS:
                    eq.append(f"| {arm} | {s} | {point} | {x:g} | {pct(f[x])} | "
                              f"{equivalent_delta(f, lo, x):g} | {pct(lo[x])} |")

    # plots: survival of TV (pooled), masked fraction per iteration, masked fraction vs delta
    colors = dict(zip(arms, ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple")))
    styles = {s: ls for s, ls in zip(seeds, ("-", "--", ":", "-."))}
    for point in POINTS:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (arm, s), d in data.items():
            x = np.sort(tv(d, point)[d["mask"] > 0])
            surv = 1.0 - np.arange(len(x)) / len(x)
            ax.step(x, surv, where="post", color=colors[arm], ls=styles[s],
                    label=f"{arm} seed {s}")
        for x in DELTAS:
            ax.axvline(x, color="gray", lw=0.6)
        ax.set(xscale="log", yscale="log", xlabel="|pi(a_t) - mu(a_t)| (binary TV)",
               ylabel="fraction of tokens above", title=f"TV of the sampled token ({point})")
        ax.set_xlim(1e-5, 1)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(plots, f"tv_survival_{point}.png"), dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(2, len(DELTAS), figsize=(12, 6.4), sharey="row", sharex=True)
    for row, point in zip(axes, POINTS):
        for ax, x in zip(row, DELTAS):
            for (arm, s) in data:
                y = iters[(arm, s, point)][f"masked@{x:g}"]
                ax.plot(np.arange(1, len(y) + 1), 100 * summary_ma(y), color=colors[arm],
                        ls=styles[s], label=f"{arm} seed {s}")
            ax.set(title=f"{point}, delta {x:g}")
        row[0].set_ylabel("masked % (A != 0), 10-it. mean")
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(plots, "masked_per_iteration.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (arm, s, point), c in curves.items():
        g = sorted(c)
        ax.plot(g, [100 * c[k] for k in g], color=colors[arm], ls=styles[s],
                marker="o" if point == "after" else "", ms=2,
                label=f"{arm} seed {s} {point}")
    for x in DELTAS:
        ax.axvline(x, color="gray", lw=0.6)
    ax.set_yscale("symlog", linthresh=0.01)  # a zero masked fraction stays on the plot
    ax.set_ylim(bottom=0)
    ax.set(xlabel="delta", ylabel="masked % of tokens with A != 0 (pooled)",
           title="DPPO-Binary-TV masked fraction vs delta")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(plots, "masked_vs_delta.png"), dpi=110)
    plt.close(fig)

    demo = ["| arm | seed | summary |", "|---|---|---|"]
    for (arm, s), wd in sorted(dirs.items(), key=lambda kv: (kv[0][1], arms.index(kv[0][0]))):
        text = summary.format_summary(summary.summarize(read_jsonl(
            os.path.join(wd, "metrics.jsonl")))).strip().replace("\n", "<br>")
        wall = float(data[(arm, s)]["wall_s"])
        demo.append(f"| {arm} | {s} | {text}<br>(wall {wall / 60:.1f} min with the probe) |")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    cmd = " ".join(["python launch/lora_calibration.py"] + sys.argv[1:])
    text = "\n".join([
        f"Generated {datetime.date.today()} by `{cmd}` at commit {commit} (jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, {platform.machine()}, {os.cpu_count()} cores); see the "
        "script's docstring for what is measured.",
        "", "### The runs' closing summaries", "", *demo, "",
        "### TV of the sampled token and DPPO's masked fraction", "",
        "TV quantiles over the valid response tokens; masked: % of the tokens with A != 0 "
        "that DPPO-Binary-TV blocks at that delta.", "", *lines, "",
        "### Which LoRA delta masks as little as full fine-tuning does", "",
        f"Grid {GRID[0]:g}..{GRID[-1]:g} step 0.01; pooled over all iterations.", "", *eq, "",
        "Masked fraction over a range of deltas (pooled over all iterations, % of the tokens "
        "with A != 0):", "", *grid_table(curves), ""])
    write_generated(os.path.join(out, "lora_calibration.md"), text)
    return text


BEGIN, END = "<!-- BEGIN generated by launch/lora_calibration.py -->", \
    "<!-- END generated by launch/lora_calibration.py -->"


def write_generated(path: str, text: str):
    """Puts ``text`` between the BEGIN / END markers of ``path`` (the prose around them is
    kept); a file without the markers gets them appended, a missing file is created."""
    block = f"{BEGIN}\n{text}\n{END}"
    old = open(path).read() if os.path.exists(path) else \
        "# LoRA trust-region calibration (launch/lora_calibration.py)\n\n"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(new)


def grid_table(curves: dict, show=(0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4)) -> list:
    lines = ["| arm | seed | point | " + " | ".join(f"{x:g}" for x in show) + " |",
             "|" + "---|" * (3 + len(show))]
    for (arm, s, point), c in sorted(curves.items()):
        lines.append(f"| {arm} | {s} | {point} | " + " | ".join(
            f"{100 * c[min(c, key=lambda g: abs(g - x))]:.3f}" for x in show) + " |")
    return lines


def summary_ma(y, window: int = 10):
    c = np.cumsum(np.insert(np.asarray(y, float), 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), window)
    return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="workdirs/lora_calibration")
    p.add_argument("--out", default="docs")
    p.add_argument("--seeds", default="0", help="comma-separated RL seeds")
    p.add_argument("--iterations", type=int, default=0, help="train.iterations (0: config's)")
    p.add_argument("--arms", default="full,lora", help="comma-separated arms: full, lora, "
                   "optionally @LEARNING_RATE (lora@3e-4)")
    p.add_argument("--analyse_only", action="store_true",
                   help="only analyse the finished arms in --workdir")
    p.add_argument("--tiny", action="store_true", help="the tiny / tiny_lora variants (a smoke "
                   "test; needs XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    args = p.parse_args(argv)
    for arm in args.arms.split(","):
        parse_arm(arm)  # a bad arm fails before anything runs
    if not args.analyse_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm in args.arms.split(","):
                run_arm(arm, seed, args.iterations, args.workdir, args.tiny)
    dirs = {}  # every finished arm in the workdir is analysed, not only this call's
    for name in sorted(os.listdir(args.workdir)):
        arm, _, seed = name.rpartition("-s")
        if os.path.exists(os.path.join(args.workdir, name, "probe.npz")):
            dirs[(arm, int(seed))] = os.path.join(args.workdir, name)
    print(analyse(dirs, args.out, args))


if __name__ == "__main__":
    main()
