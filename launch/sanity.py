r"""The laptop-scale sanity study (configs/sanity.py): run every method x seed, then summarise.

    python launch/sanity.py --workdir=workdirs/sanity [--parallel=2] [--small | --stress | --quant]
        [--analyze_only] [--out=docs]

Runs configs/sanity.py's get_sweep() through launch/sweep.py (runs already finished are skipped
by resuming), then writes OUT/results_table.md (final / best training reward, collapse
iteration, iterations to reach the reward threshold, held-out reward, mismatch, masked fraction,
wall time; mean +- spread over seeds) and OUT/sanity_plots/*.png via trustrl.analysis.plot.
``--small`` is the CI-sized variant (tiny model, 3 iterations, 1 seed of two methods).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import sweep  # noqa: E402
from trustrl.analysis import plot  # noqa: E402
from trustrl.infra.metrics import read_jsonl  # noqa: E402

CONFIG = "configs/sanity.py"
THRESHOLD = 0.9  # training reward (10-iteration mean) counted as "reached"
WINDOW = 10


def finished(run_dir: str) -> bool:
    """The run logged its last iteration (so re-running the study skips it without starting a
    process that would only restore and exit)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path) or not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return False
    import json
    with open(path) as f:
        iterations = json.load(f)["train"]["iterations"]
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return bool(rows) and rows[-1]["step"] >= iterations


_KEPT = ("config.json", "log.txt", "filter.json")  # copied as they are (small)
BASE = "_base"  # KEEP_DIR/_base: the warm-start and filter caches the runs started from


def archive(workdir: str, entries, keep_dir: str) -> list[str]:
    """Copies each finished run's config.json, log.txt, filter.json and metrics.jsonl (gzipped,
    as KEEP_DIR/RUN/metrics.jsonl.gz) into ``keep_dir``, a tracked folder, and the warm-start /
    filter caches its config names (warmstart.cache_dir) into KEEP_DIR/_base: a study that
    spans sessions keeps its results and its base when the workdir (ignored by git) is gone.
    Returns the runs archived now (an archived run or cache file is not rewritten)."""
    import gzip
    import json
    import shutil
    done = []
    for e in entries:
        name = sweep.run_name(e)
        src, dst = os.path.join(workdir, name), os.path.join(keep_dir, name)
        if not finished(src) or os.path.exists(os.path.join(dst, "metrics.jsonl.gz")):
            continue
        os.makedirs(dst, exist_ok=True)
        for f in _KEPT:
            if os.path.exists(os.path.join(src, f)):
                shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
        tmp = os.path.join(dst, "metrics.jsonl.gz.tmp")
        with open(os.path.join(src, "metrics.jsonl"), "rb") as f, open(tmp, "wb") as raw, \
                gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as g:
            shutil.copyfileobj(f, g)
        os.replace(tmp, os.path.join(dst, "metrics.jsonl.gz"))  # complete, or absent
        with open(os.path.join(src, "config.json")) as f:
            cache = json.load(f).get("warmstart", {}).get("cache_dir", "")
        if cache and os.path.isdir(cache):
            os.makedirs(os.path.join(keep_dir, BASE), exist_ok=True)
            for f in sorted(os.listdir(cache)):
                out = os.path.join(keep_dir, BASE, f)
                if not os.path.exists(out) and not f.endswith(".tmp"):
                    shutil.copyfile(os.path.join(cache, f), out + ".tmp")
                    os.replace(out + ".tmp", out)
        done.append(name)
    return done


def unarchive(keep_dir: str, workdir: str, entries) -> list[str]:
    """Restores the archived runs (``archive``) that ``workdir`` lacks or has unfinished, so
    that they count as finished (not rerun) and enter the tables and plots, and the archived
    base into the cache folder of their configs where it is missing (so that new runs start
    from the same base). A run folder already there is replaced only when unfinished (what a
    killed run left). Returns the runs restored."""
    import gzip
    import json
    import shutil
    done = []
    for e in entries:
        name = sweep.run_name(e)
        src, dst = os.path.join(keep_dir, name), os.path.join(workdir, name)
        if not os.path.exists(os.path.join(src, "metrics.jsonl.gz")):
            continue
        with open(os.path.join(src, "config.json")) as f:
            cache = json.load(f).get("warmstart", {}).get("cache_dir", "")
        base = os.path.join(keep_dir, BASE)
        if cache and os.path.isdir(base):
            os.makedirs(cache, exist_ok=True)
            for f in sorted(os.listdir(base)):
                if not os.path.exists(os.path.join(cache, f)):
                    shutil.copyfile(os.path.join(base, f), os.path.join(cache, f))
        if finished(dst):
            continue
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        for f in _KEPT:
            if os.path.exists(os.path.join(src, f)):
                shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
        with gzip.open(os.path.join(src, "metrics.jsonl.gz"), "rb") as g, \
                open(os.path.join(dst, "metrics.jsonl"), "wb") as f:
            shutil.copyfileobj(g, f)
        done.append(name)
    return done


def run_missing(config: str, entries, workdir: str, variant: str = "", parallel: int = 2,
                max_runs: int | None = None, cache_ready: bool = False) -> list[str]:
    """Runs the entries not finished yet (at most ``max_runs`` of them, in order) through
    launch/sweep.py; returns the failed runs. The first run goes alone, building the shared warm
    start and filter cache, unless some run has finished or ``cache_ready``; then ``parallel``
    at a time."""
    todo = [e for e in entries if not finished(os.path.join(workdir, sweep.run_name(e)))]
    todo = todo[:max_runs] if max_runs is not None else todo
    cmds = sweep.commands(config, todo, workdir, variant)
    first = 0 if (len(todo) < len(entries) or cache_ready) else 1
    return sweep.run_commands(cmds[:first], 1) + sweep.run_commands(cmds[first:], parallel)


def smooth(y, w=WINDOW):
    y = np.asarray(y, float)
    return np.array([y[max(0, i - w + 1):i + 1].mean() for i in range(len(y))])


def collapse_iteration(steps, reward, mismatch_max):
    """First iteration after the best 10-iteration mean where the mean falls below half the best
    and stays there to the end, with max (pi - mu) above its early level. None if no collapse."""
    s = smooth(reward)
    best = int(np.argmax(s))
    below = s < 0.5 * s[best]
    for i in range(best + 1, len(s)):
        if below[i:].all():
            early = np.nanmean(mismatch_max[:WINDOW]) if len(mismatch_max) else np.nan
            late = np.nanmean(mismatch_max[i:]) if len(mismatch_max) else np.nan
            return int(steps[i]) if not late <= early else None
    return None


def summarise(run_dir: str, max_step: int | None = None) -> dict:
    """One run's table entries, over its iterations up to max_step (all when None)."""
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    rows = [r for r in rows if max_step is None or r["step"] <= max_step]
    # held-out reward: T=1 samples on the test prompts (greedy pass@1 is also logged, but greedy
    # decoding of filler text is degenerate, so it is not the policy being trained)
    evals = [r["eval/sampled_reward_mean"] for r in rows if "eval/sampled_reward_mean" in r]
    rows = [r for r in rows if "reward/mean" in r]  # the step-0 row holds only the base's eval
    steps = np.array([r["step"] for r in rows])
    reward = np.array([r["reward/mean"] for r in rows])
    mm_max = np.array([r.get("rollout/mismatch_max", np.nan) for r in rows])
    s = smooth(reward)
    reach = np.flatnonzero(s >= THRESHOLD)
    return {
        "final": float(s[-1]), "best": float(s.max()),
        "collapse": collapse_iteration(steps, reward, mm_max),
        "reach": int(steps[reach[0]]) if reach.size else None,
        "eval_final": evals[-1] if evals else np.nan,
        "mismatch_mean": float(np.nanmean([r.get("rollout/mismatch_mean", np.nan) for r in rows])),
        "mismatch_max": float(np.nanmax(mm_max)) if np.isfinite(mm_max).any() else np.nan,
        "masked": float(np.nanmean([r.get("loss/masked_frac", np.nan) for r in rows])),
        "wall_s": float(sum(r.get("time/iteration_s", 0.0) for r in rows)),
        "iterations": int(steps[-1]),
    }


def _fmt(values, digits=3):
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}"


def table(root: str, entries, max_step: int | None = None) -> str:
    groups = defaultdict(list)
    for e in entries:
        d = os.path.join(root, sweep.run_name(e))
        if os.path.exists(os.path.join(d, "metrics.jsonl")):
            groups[e["config_arg"]].append(summarise(d, max_step))
    lines = [
        f"| method | seeds | iterations | final reward | best reward | collapsed (iteration) | reached "
        f"{THRESHOLD} at | held-out reward | mean abs(pi-mu) | max (pi-mu) | masked frac | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        collapses = [r["collapse"] for r in runs]
        reaches = [r["reach"] for r in runs]
        lines.append(
            f"| {name} | {len(runs)} | {_fmt([r['iterations'] for r in runs], 0)} | "
            f"{_fmt([r['final'] for r in runs])} | "
            f"{_fmt([r['best'] for r in runs])} | "
            f"{sum(c is not None for c in collapses)}/{len(runs)} "
            f"{[c for c in collapses if c is not None] or ''} | "
            f"{sum(x is not None for x in reaches)}/{len(runs)} "
            f"{_fmt([x for x in reaches if x is not None], 0)} | "
            f"{_fmt([r['eval_final'] for r in runs])} | "
            f"{_fmt([r['mismatch_mean'] for r in runs], 5)} | "
            f"{_fmt([r['mismatch_max'] for r in runs])} | {_fmt([r['masked'] for r in runs], 4)} | "
            f"{_fmt([r['wall_s'] for r in runs], 0)} |")
    return "\n".join(lines) + "\n"


def diagnostics(root: str, entries, max_step: int | None = None) -> str:
    """Per method, averaged over seeds: masked fraction by advantage sign, mean abs(pi - mu) in
    the first and last WINDOW iterations, gradient norm (mean, max), entropy at the end. The
    evidence for why a method does (not) collapse."""
    groups = defaultdict(list)
    for e in entries:
        path = os.path.join(root, sweep.run_name(e), "metrics.jsonl")
        if os.path.exists(path):
            rows = [r for r in read_jsonl(path) if "reward/mean" in r
                    and (max_step is None or r["step"] <= max_step)]
            if rows:
                groups[e["config_arg"]].append(rows)
    col = lambda rows, k: np.array([r.get(k, np.nan) for r in rows], float)
    lines = ["| method | masked A>0 | masked A<0 | mean abs(pi-mu), first 10 | last 10 | "
             "grad norm mean | grad norm max | entropy, last 10 |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        stat = lambda f: float(np.nanmean([f(rows) for rows in runs]))
        pct = lambda k: f"{100 * stat(lambda r: np.nanmean(col(r, k))):.2f}%"
        lines.append(
            f"| {name} | {pct('loss/masked_frac_pos')} | {pct('loss/masked_frac_neg')} | "
            f"{stat(lambda r: np.nanmean(col(r, 'rollout/mismatch_mean')[:WINDOW])):.5f} | "
            f"{stat(lambda r: np.nanmean(col(r, 'rollout/mismatch_mean')[-WINDOW:])):.5f} | "
            f"{stat(lambda r: np.nanmean(col(r, 'train/grad_norm'))):.3f} | "
            f"{stat(lambda r: np.nanmax(col(r, 'train/grad_norm'))):.3f} | "
            f"{stat(lambda r: np.nanmean(col(r, 'train/entropy')[-WINDOW:])):.3f} |")
    return "\n".join(lines) + "\n"


def mismatch_profile(workdir: str, batches: int = 4, small: bool = False,
                     names=("pg_is", "pg_is_fp32")) -> str:
    """Where the rollout / trainer mismatch sits: `batches` rollout batches of the base policy
    (before any RL update), bucketed by the rollout probability mu of each sampled token, for the
    sanity runs `names` (by default the bf16 rollout and the fp32 control). Returns a markdown
    table."""
    import jax
    from configs import sanity as sanity_cfg
    from trustrl.training import experiment, step as ts
    from trustrl.rollout import record as rollout

    lines = ["| rollout | mu bucket | tokens | share | mean abs(pi-mu) | mean abs(log pi/mu) | "
             "max ratio |", "|---|---|---|---|---|---|---|"]
    for name in names:
        cfg = sanity_cfg.get_config(name + (",small" if small else ""))
        run = experiment.build(cfg, os.path.join(workdir, name))
        params_roll = run.rollout_params(run.state.params)
        key, logps = run.key, []
        for _ in range(batches):
            key, sub = jax.random.split(key)
            prompts = run.env.encode_prompts(next(run.prompt_iter))
            r = run.sampler.generate(params_roll, prompts, cfg.rollout.group_size, sub)
            batch = ts.rollout_batch(r, np.zeros(r.response_tokens.shape[0], np.float32))
            logps.append((np.asarray(run.score(run.state.params, batch)),
                          np.asarray(r.rollout_logp), np.asarray(r.response_mask)))
        stacked = [np.concatenate([x[i] for x in logps]) for i in range(3)]
        for b in rollout.mismatch_by_mu(*stacked):
            lines.append(f"| {cfg.rollout.dtype} | [{b['mu_low']}, {b['mu_high']}) | "
                         f"{b['tokens']} | {b['share']:.3f} | {b['mean_abs_diff']:.2e} | "
                         f"{b['mean_abs_log_ratio']:.2e} | {b['max_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="workdirs/sanity")
    p.add_argument("--out", default="docs")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--small", action="store_true", help="CI-sized variant")
    p.add_argument("--stress", action="store_true",
                   help="the follow-up with a larger step per iteration (configs/sanity.py "
                        "STRESS_*): runs in WORKDIR_stress, writes OUT/stress_table.md and "
                        "OUT/stress_plots")
    p.add_argument("--quant", action="store_true",
                   help="issue 15's study: int8 / fp8 rollouts with bf16 / fp32 controls and a "
                        "bf16 trainer, 200 iterations (configs/sanity.py get_quant_sweep(), in "
                        "priority order): runs in WORKDIR_quant, writes OUT/quant_table.md and "
                        "OUT/quant_plots; with --mismatch_profile, profiles int8 / fp8 too")
    p.add_argument("--analyze_only", action="store_true")
    p.add_argument("--max_iteration", type=int, default=None,
                   help="summarise every run over its first N iterations (default: all)")
    p.add_argument("--mismatch_profile", action="store_true",
                   help="only profile the base policy's bf16 / fp32 mismatch by mu bucket "
                        "(WORKDIR_profile, OUT/mismatch_profile.md)")
    a = p.parse_args(argv)
    if a.mismatch_profile:
        names = ("pg_is", "pg_is_fp32") + (("pg_is_int8", "pg_is_fp8") if a.quant else ())
        text = mismatch_profile(a.workdir.rstrip("/") + "_profile", small=a.small, names=names)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, ("quant_" if a.quant else "") + "mismatch_profile.md"),
                  "w") as f:
            f.write(text)
        print(text)
        return 0
    entries = sweep.load_sweep(CONFIG)
    variant, table_name, plots_name = "", "results_table.md", "sanity_plots"
    if a.small:
        variant = "small"
        entries = [{"config_arg": n, "seed": 0} for n in ("dppo_binary_tv", "pg_is")]
    elif a.stress:
        from configs import sanity as sanity_cfg
        variant, table_name, plots_name = "stress", "stress_table.md", "stress_plots"
        entries = [{"config_arg": n, "seed": 0} for n in sanity_cfg.STRESS_METHODS]
        a.workdir = a.workdir.rstrip("/") + "_stress"
    elif a.quant:
        from configs import sanity as sanity_cfg
        variant, table_name, plots_name = "long", "quant_table.md", "quant_plots"
        entries = sanity_cfg.get_quant_sweep()
        a.workdir = a.workdir.rstrip("/") + "_quant"
    if not a.analyze_only:
        failed = run_missing(CONFIG, entries, a.workdir, variant, a.parallel)
        if failed:
            print(f"{len(failed)} run(s) failed; see their log.txt: {failed}")
            return 1
    os.makedirs(a.out, exist_ok=True)
    text = table(a.workdir, entries, a.max_iteration)
    with open(os.path.join(a.out, table_name), "w") as f:  # pasted into results.md
        f.write(text)
    print(text)
    diag = diagnostics(a.workdir, entries, a.max_iteration)
    with open(os.path.join(a.out, table_name.replace("table", "diagnostics")), "w") as f:
        f.write(diag)
    print(diag)
    dirs = [os.path.join(a.workdir, sweep.run_name(e)) for e in entries]
    dirs = [d for d in dirs if os.path.exists(os.path.join(d, "metrics.jsonl"))]
    plot.plot_runs(dirs, os.path.join(a.out, plots_name), group_seeds=True, smooth=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
